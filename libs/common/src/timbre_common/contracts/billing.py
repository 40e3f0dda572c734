"""Billing: quota answers and usage for the gateway, checkout and webhooks."""
from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field

from .base import Command, Event, Reply


class CheckQuota(Command):
    """Whether `characters` more fit; with `reserve`, an allowed answer also holds them (see QuotaDecision)."""

    TYPE: ClassVar[str] = "billing.check_quota"
    account_id: str
    characters: int
    reserve: bool = False


class QuotaDecision(Reply):
    """`hold_id` names the characters held for the request (reserve and billing on): pass it to the job."""

    TYPE: ClassVar[str] = "billing.quota_decision"
    allowed: bool
    remaining: int | None = None
    reason: str | None = None
    hold_id: str | None = None


class ReleaseHold(Command):
    """Give back a hold no job will consume (a cache hit, a joined job, a submission that failed)."""

    TYPE: ClassVar[str] = "billing.release_hold"
    account_id: str
    hold_id: str


class GetUsage(Command):
    TYPE: ClassVar[str] = "billing.get_usage"
    account_id: str


class UsageReport(Reply):
    TYPE: ClassVar[str] = "billing.usage"
    account_id: str
    period_start: datetime
    period_end: datetime
    characters_used: int
    jobs: int = 0
    quota: int | None = None
    remaining: int | None = None
    billing: str = "off"


class StartCheckout(Command):
    """A checkout for a new account; with `account_id` (the gateway authenticated the caller's key), a renewal of
    that account. The gateway never sets `account_id` from anything but a key."""

    TYPE: ClassVar[str] = "billing.start_checkout"
    email: str
    account_id: str | None = None


class CheckoutStarted(Reply):
    TYPE: ClassVar[str] = "billing.checkout_started"
    url: str
    token: str | None = None
    already_subscribed: bool = False


class GetCheckoutStatus(Command):
    TYPE: ClassVar[str] = "billing.checkout_status"
    token: str


class CheckoutStatus(Reply):
    TYPE: ClassVar[str] = "billing.checkout_status_reply"
    ready: bool
    account_id: str | None = None
    customer_id: str | None = None
    email: str | None = None


class HandleStripeWebhook(Command):
    """The raw webhook body is the binary payload; the signature header travels as a field."""

    TYPE: ClassVar[str] = "billing.stripe_webhook"
    BINARY: ClassVar[bool] = True
    signature: str


class WebhookOutcome(Reply):
    TYPE: ClassVar[str] = "billing.webhook_outcome"
    event_id: str
    event_type: str
    applied: bool
    actions: list[dict[str, Any]] = Field(default_factory=list)


class AccountProvisioningRequested(Event):
    """A checkout completed: the gateway creates the account and mints its key."""

    TYPE: ClassVar[str] = "billing.account_provisioning_requested"
    account_id: str
    customer_id: str
    email: str
    checkout_token: str | None = None


class AccountKeysRevoked(Event):
    """A subscription went unpaid or was cancelled: the gateway revokes the account's keys."""

    TYPE: ClassVar[str] = "billing.account_keys_revoked"
    account_id: str
    reason: str


class AccountKeysRestored(Event):
    TYPE: ClassVar[str] = "billing.account_keys_restored"
    account_id: str
