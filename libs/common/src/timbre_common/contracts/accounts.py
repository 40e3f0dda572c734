"""Accounts: purge across every service, and provisioning after a checkout."""
from __future__ import annotations

from typing import ClassVar

from .base import Event

# Services that hold account rows and must confirm a purge.
PURGING_SERVICES = ("gateway", "voices", "dispatcher", "storage", "billing")


class AccountPurgeRequested(Event):
    TYPE: ClassVar[str] = "account.purge_requested"
    account_id: str
    purge_id: str


class AccountPurged(Event):
    """One service has removed every row (and object) of the account."""

    TYPE: ClassVar[str] = "account.purged"
    account_id: str
    purge_id: str
    service: str
    removed: int = 0


class ApiKeysChanged(Event):
    """The gateway changed what an account's keys may do (a key revoked or its limits changed, the account's keys
    suspended or restored, the account deleted), committed with the change: every gateway instance forgets
    the keys it holds in memory for the account."""

    TYPE: ClassVar[str] = "account.keys_changed"
    account_id: str
