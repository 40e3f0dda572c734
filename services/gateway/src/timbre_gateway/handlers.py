"""Gateway event handlers.

Consumes: account.purge_requested (delete keys and accounts), account.purged (record confirmations),
billing.account_provisioning_requested (mint a key after a checkout), billing.account_keys_revoked /
restored (suspend or reactivate an account); a timer in bootstrap -> sweep_checkout_keys (erase the
plaintext of checkout keys nobody collected).
Emits: account.purged (through the outbox, with the deletion; and, through the webhook handlers, the
account.purged client webhook); account.purge_requested again for purges left unconfirmed; a purge still
unconfirmed after PURGE_DEADLINE_S ends `failed` and is logged as an alert.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from timbre_common.contracts import Envelope
from timbre_common.contracts.accounts import PURGING_SERVICES, AccountPurged, AccountPurgeRequested, ApiKeysChanged
from timbre_common.contracts.billing import AccountKeysRestored, AccountKeysRevoked, AccountProvisioningRequested
from timbre_common.logging import get_logger
from timbre_common.ports import MessageBus

from .adapters.repository import AccountRepository

log = get_logger(__name__)


async def on_purge_requested(event: AccountPurgeRequested, *, envelope: Envelope, accounts: AccountRepository,
                             bus: MessageBus, announce_purge: Callable[..., Awaitable[int]] | None = None) -> None:
    if announce_purge is not None:
        # Client webhooks: account.purged goes out to the endpoints that want it, then the endpoints go.
        await announce_purge(account_id=event.account_id, purge_id=event.purge_id, envelope=envelope)
    async with bus.transaction():
        removed = await accounts.delete_account(event.account_id)
        await bus.publish(AccountPurged(account_id=event.account_id, purge_id=event.purge_id, service="gateway",
                                        removed=removed))


async def resend_unfinished_purges(*, accounts: AccountRepository, bus: MessageBus, older_than_s: float = 60.0,
                                   within_s: float = 7 * 24 * 3600) -> int:
    """Ask again for purges a service has not confirmed (a lost request, an event dead-lettered in an outage):
    every purge consumer deletes idempotently and the first confirmation of each service counts."""
    unfinished = await accounts.unfinished_purges(older_than_s=older_than_s, within_s=within_s)
    for row in unfinished:
        await bus.publish(AccountPurgeRequested(account_id=row["account_id"], purge_id=str(row["purge_id"])))
        log.warning("purge_requested_again", purge_id=str(row["purge_id"]),
                    missing=sorted(set(PURGING_SERVICES) - set(row["confirmed"] or {})))
    return len(unfinished)


async def fail_overdue_purges(*, accounts: AccountRepository, deadline_s: float) -> int:
    """A purge not confirmed by every service within `deadline_s` ends `failed`: an operator must look."""
    failed = await accounts.fail_overdue_purges(deadline_s=deadline_s, required=PURGING_SERVICES)
    for row in failed:
        log.error("purge_failed", alert=True, purge_id=str(row["purge_id"]), account=row["account_id"],
                  missing=list(row["missing"] or []), requested_at=row["requested_at"].isoformat(),
                  deadline_s=deadline_s)
    return len(failed)


async def on_purged(event: AccountPurged, *, envelope: Envelope, accounts: AccountRepository) -> None:
    await accounts.confirm_purge(event.purge_id, event.service, event.removed, PURGING_SERVICES)
    log.info("purge_confirmed", purge_id=event.purge_id, confirmed_by=event.service, removed=event.removed)


@contextlib.asynccontextmanager
async def keys_change(bus: MessageBus | None, account_id: str) -> AsyncIterator[None]:
    """Change an account's keys or standing and announce it in the same transaction (account.keys_changed):
    every gateway instance then forgets the keys it holds in memory for the account."""
    if bus is None:
        yield
        return
    async with bus.transaction():
        yield
        await bus.publish(ApiKeysChanged(account_id=account_id))


async def on_provisioning_requested(event: AccountProvisioningRequested, *, envelope: Envelope,
                                    accounts: AccountRepository, bus: MessageBus | None = None) -> None:
    """A paid checkout: create the account and a key, kept for one read by the success page."""
    if await accounts.account_exists(event.account_id):
        async with keys_change(bus, event.account_id):
            await accounts.restore_account(event.account_id)
        # A checkout whose key is stored is done; one without (a crash between minting and storing, or a
        # returning customer's new checkout) still owes its success page a key.
        if not event.checkout_token or await accounts.checkout_key_stored(event.checkout_token):
            return
    key, _ = await accounts.create_key(label="checkout", account_id=event.account_id, email=event.email)
    if event.checkout_token:
        await accounts.store_checkout_key(event.checkout_token, event.account_id, key)
    log.info("account_provisioned", account=event.account_id)


async def sweep_checkout_keys(*, accounts: AccountRepository, max_age_s: float) -> int:
    """Erase checkout key plaintexts nobody collected within `max_age_s`; how many."""
    erased = await accounts.erase_expired_checkout_keys(max_age_s=max_age_s)
    if erased:
        log.info("checkout_keys_expired", keys=erased)
    return erased


async def on_keys_revoked(event: AccountKeysRevoked, *, envelope: Envelope, accounts: AccountRepository,
                          bus: MessageBus | None = None) -> None:
    async with keys_change(bus, event.account_id):
        await accounts.revoke_account_keys(event.account_id)
    log.info("account_suspended", account=event.account_id, reason=event.reason)


async def on_keys_restored(event: AccountKeysRestored, *, envelope: Envelope, accounts: AccountRepository,
                           bus: MessageBus | None = None) -> None:
    async with keys_change(bus, event.account_id):
        await accounts.restore_account(event.account_id)
