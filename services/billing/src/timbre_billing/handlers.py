"""Billing handlers: plain async functions, dependencies by keyword, no broker or HTTP knowledge.

Consumes:
  - HandleStripeWebhook RPC (the gateway relays POST /v1/webhooks/stripe: raw body + Stripe-Signature)
    -> handle_stripe_webhook
  - StartCheckout RPC -> start_checkout; GetCheckoutStatus RPC -> checkout_status (paid or not: the
    gateway mints and holds the API key itself, billing never sees it)
  - CheckQuota RPC -> check_quota (with reserve: holds the characters, under the account's lock);
    ReleaseHold RPC -> release_hold; GetUsage RPC -> usage
  - job.ready (characters of a finished job) -> record_usage (and drops the job's hold)
  - job.failed -> release_hold (the job's hold)
  - account.purge_requested -> the repository's delete_account (in bus_adapters)
Emits (returned to the caller, who publishes; a redelivered webhook returns the same requests again):
  - WebhookOutcome.provision -> billing.account_provisioning_requested (the gateway creates account
    `account_id`, assigned here, or reuses it, and mints the checkout's API key)
  - WebhookOutcome.revoke -> billing.account_keys_revoked (reason unpaid | canceled)
  - WebhookOutcome.restore -> billing.account_keys_restored (unpaid -> served again)
  - account.purged (bus_adapters, after a purge)
"""
from __future__ import annotations

import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Protocol
from urllib.parse import quote

from timbre_common import metrics
from timbre_common.logging import get_logger

from .adapters.repository import BillingRepository, BillingTransaction
from .adapters.webhooks import verify_event
from .domain import (
    CANCELED,
    REVOKING_STATUSES,
    SERVED_STATUSES,
    BillingDisabled,
    CheckoutStart,
    CheckoutStatus,
    ProvisionAccount,
    QuotaDecision,
    RestoreAccess,
    RevokeAccess,
    StripeEvent,
    SubscriptionSnapshot,
    UnknownCheckoutToken,
    UsageReport,
    WebhookOutcome,
    checkout_session_fields,
    current_period,
    decide_quota,
    normalize_email,
    outcome_actions,
    outcome_from_actions,
    subscription_from_stripe,
    subscription_update_verdict,
)
from .settings import BillingSettings

log = get_logger(__name__)

_CHECKOUT_DONE = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
_SUBSCRIPTION_CHANGED = ("customer.subscription.created", "customer.subscription.updated")


class StripeApi(Protocol):
    """What the handlers need of Stripe (StripeGateway, or a fake in unit tests)."""

    async def create_checkout_session(
        self,
        customer_email: str,
        token: str,
        success_url: str,
        cancel_url: str,
        *,
        customer_id: str | None = None,
        expires_at: int | None = None,
    ) -> tuple[str, str]: ...

    async def retrieve_subscription(self, subscription_id: str) -> SubscriptionSnapshot: ...

    async def find_active_subscription(self, customer_id: str) -> SubscriptionSnapshot | None: ...


def _require_enabled(settings: BillingSettings) -> None:
    if not settings.enabled:
        raise BillingDisabled("billing is off")


async def start_checkout(
    email: str,
    *,
    repository: BillingRepository,
    stripe: StripeApi,
    settings: BillingSettings,
    account_id: str | None = None,
    now: float | None = None,
) -> CheckoutStart:
    """A Checkout Session URL: for a new account, or (`account_id`, an authenticated checkout) to renew that one.

    An unauthenticated checkout always provisions a new account and its answer never depends on the email:
    nothing is looked up by address, so it can neither attach a stranger's payment to an existing account nor
    tell anyone whether an address subscribes. Only the account's own key learns that it is already subscribed.
    """
    _require_enabled(settings)
    address = normalize_email(email)
    base = settings.app_base_url
    customer_id = None
    if account_id is not None:
        customer_id = await repository.customer_id_for_account(account_id)
        served = await repository.subscription_for_account(account_id)
        if served is not None and served.status not in SERVED_STATUSES:
            served = None
        # Stripe may know a subscription whose webhook has not landed yet.
        if served is None and customer_id is not None:
            served = await stripe.find_active_subscription(customer_id)
        if served is not None:
            return CheckoutStart(url=f"{base}/v1/checkout/already-subscribed", already_subscribed=True)
    token = secrets.token_urlsafe(32)
    await repository.create_checkout_token(token, address, account_id)
    moment = time.time() if now is None else now
    session_id, url = await stripe.create_checkout_session(
        address,
        token,
        success_url=f"{base}/v1/checkout/success?token={quote(token)}",
        cancel_url=f"{base}/v1/signup",
        customer_id=customer_id,
        # The session dies with its token (Stripe accepts 30 min to 24 h), so nobody pays for a forgotten checkout.
        expires_at=int(moment + settings.stripe_session_ttl_s),
    )
    await repository.attach_session(token, session_id)
    log.info("checkout_started", session_id=session_id, renewal=account_id is not None)
    return CheckoutStart(url=url, already_subscribed=False, session_id=session_id)


async def expire_checkouts(*, repository: BillingRepository, settings: BillingSettings) -> int:
    """Delete checkouts nobody paid within CHECKOUT_TOKEN_TTL_S (their Stripe sessions expired before)."""
    # Kept a little past its Stripe session too, so a payment made in the session's last minute finds its row.
    older_than = max(settings.checkout_token_ttl_s, settings.stripe_session_ttl_s) + 600
    expired = await repository.expire_open_checkouts(older_than)
    if expired:
        log.info("checkout_tokens_expired", tokens=expired)
    return expired


async def handle_stripe_webhook(
    payload: bytes,
    sig_header: str,
    *,
    repository: BillingRepository,
    stripe: StripeApi,
    settings: BillingSettings,
    now: float | None = None,
) -> WebhookOutcome:
    """Verify a Stripe delivery and apply its event exactly once, in one transaction."""
    _require_enabled(settings)
    event = verify_event(
        payload, sig_header, settings.webhook_secrets(), tolerance_s=settings.webhook_tolerance_s, now=now
    )
    # Stripe I/O stays outside the transaction: fetch the subscription a checkout created first.
    fetched: SubscriptionSnapshot | None = None
    if event.type in _CHECKOUT_DONE and not await repository.event_seen(event.id):
        _, _, _, subscription_id, paid = checkout_session_fields(event.object)
        if subscription_id and paid:
            fetched = await stripe.retrieve_subscription(subscription_id)
    async with repository.transaction() as tx:
        if not await tx.claim_event(event):
            outcome, actions = await tx.stored_outcome(event.id)
            log.info("stripe_event_duplicate", event_id=event.id, event_type=event.type)
            return outcome_from_actions(event, outcome, actions)
        result = await _apply(event, tx, fetched)
        await tx.finish_event(event.id, result.outcome, outcome_actions(result))
    log.info("stripe_event_applied", event_id=event.id, event_type=event.type, outcome=result.outcome)
    return result


async def _apply(
    event: StripeEvent, tx: BillingTransaction, fetched: SubscriptionSnapshot | None
) -> WebhookOutcome:
    if event.type in _CHECKOUT_DONE:
        return await _apply_checkout(event, tx, fetched)
    if event.type in _SUBSCRIPTION_CHANGED:
        return await _apply_subscription_change(event, tx)
    if event.type == "customer.subscription.deleted":
        return await _apply_subscription_deleted(event, tx)
    return WebhookOutcome(event.id, event.type, "ignored")


async def _apply_checkout(
    event: StripeEvent, tx: BillingTransaction, fetched: SubscriptionSnapshot | None
) -> WebhookOutcome:
    customer_id, email, token, subscription_id, paid = checkout_session_fields(event.object)
    if event.object.get("mode") != "subscription" or not customer_id or not paid:
        return WebhookOutcome(event.id, event.type, "ignored")
    known, intended = await tx.checkout_intent(token) if token else (False, None)
    existing = await tx.upsert_customer(customer_id, email)
    if known:
        # Timbre started this checkout and decided its account then: the caller's own (an authenticated
        # renewal) or a new one. A customer already tied to another account is never followed.
        if existing is not None and existing != intended:
            log.error("checkout_customer_conflict", event_id=event.id, customer_id=customer_id,
                      renewal=intended is not None)
            return WebhookOutcome(event.id, event.type, "ignored")
        account_id = intended or existing or str(uuid.uuid4())
        await tx.link_customer(customer_id, account_id)
    else:
        # A session made outside Timbre's checkout (the Stripe dashboard, a payment link): only the holder of the
        # Stripe secret key can make one, so its customer's account is the operator's choice.
        account_id = existing or await tx.assign_account(customer_id, str(uuid.uuid4()))
    if fetched is not None:
        stored = await tx.lock_subscription(fetched.subscription_id)
        if subscription_update_verdict(stored, event.created) == "apply":
            await tx.save_subscription(fetched, event.created)
    if token:
        session_id = str(event.object.get("id") or "") or None
        await tx.mark_token_paid(token, (email or "").lower(), session_id, customer_id, account_id)
    provision = ProvisionAccount(
        account_id=account_id,
        customer_id=customer_id,
        email=(email or "").lower(),
        checkout_token=token,
        subscription_id=subscription_id,
        new_account=existing is None and not (known and intended),
    )
    return WebhookOutcome(event.id, event.type, "applied", provision=provision)


async def _apply_subscription_change(event: StripeEvent, tx: BillingTransaction) -> WebhookOutcome:
    snap = subscription_from_stripe(event.object)
    stored = await tx.lock_subscription(snap.subscription_id)
    verdict = subscription_update_verdict(stored, event.created)
    if verdict != "apply":
        log.info("stripe_event_not_applied", event_id=event.id, verdict=verdict)
        return WebhookOutcome(event.id, event.type, "stale")
    if snap.status == CANCELED:
        # An `updated` to canceled ends it like a deletion would; nothing later resurrects it.
        return await _apply_subscription_deleted(event, tx)
    await tx.upsert_customer(snap.customer_id, None)
    await tx.save_subscription(snap, event.created)
    was_revoked = stored is not None and stored.status in REVOKING_STATUSES
    revoke, restore = None, None
    # Only transitions ask anything of the gateway; a repeated `unpaid` is already handled.
    if snap.status in REVOKING_STATUSES and not was_revoked:
        account_id = await tx.account_of_customer(snap.customer_id)
        revoke = RevokeAccess(snap.customer_id, account_id, snap.subscription_id, "unpaid")
    elif snap.status in SERVED_STATUSES and was_revoked:
        account_id = await tx.account_of_customer(snap.customer_id)
        restore = RestoreAccess(snap.customer_id, account_id, snap.subscription_id)
    return WebhookOutcome(event.id, event.type, "applied", revoke=revoke, restore=restore)


async def _apply_subscription_deleted(event: StripeEvent, tx: BillingTransaction) -> WebhookOutcome:
    snap = subscription_from_stripe(event.object)
    stored = await tx.lock_subscription(snap.subscription_id)
    ended = SubscriptionSnapshot(
        subscription_id=snap.subscription_id,
        customer_id=snap.customer_id,
        status=CANCELED,
        current_period_start=snap.current_period_start,
        current_period_end=snap.current_period_end,
        canceled_at=snap.canceled_at or datetime.fromtimestamp(event.created, tz=UTC),
    )
    await tx.upsert_customer(snap.customer_id, None)
    # Deletion is terminal, so it applies whatever order it arrives in.
    await tx.save_subscription(ended, event.created)
    if stored is not None and stored.status == CANCELED:
        return WebhookOutcome(event.id, event.type, "stale")
    revoke = RevokeAccess(
        customer_id=snap.customer_id,
        account_id=await tx.account_of_customer(snap.customer_id),
        subscription_id=snap.subscription_id,
        reason="canceled",
    )
    return WebhookOutcome(event.id, event.type, "applied", revoke=revoke)


async def checkout_status(token: str, *, repository: BillingRepository) -> CheckoutStatus:
    """Whether the checkout behind `token` is paid, and the account billing assigned to it."""
    row = await repository.checkout_token(token)
    if row is None:
        raise UnknownCheckoutToken("unknown checkout token")
    if row["status"] != "paid":
        return CheckoutStatus(paid=False)
    return CheckoutStatus(paid=True, account_id=row["account_id"], customer_id=row["customer_id"],
                          email=row["email"])


async def record_usage(
    job_id: str,
    account_id: str,
    characters: int,
    occurred_at: datetime,
    *,
    repository: BillingRepository,
    settings: BillingSettings,
    hold_id: str | None = None,
) -> bool:
    """Count a finished job's characters once per job, turning its hold into usage; False for a repeat."""
    if characters < 0:
        raise ValueError("characters must be >= 0")
    subscription = await repository.subscription_for_account(account_id)
    period = current_period(subscription, occurred_at, billing_enabled=settings.enabled)
    return await repository.record_usage(job_id, account_id, characters, occurred_at, period.start,
                                         hold_id=hold_id)


async def release_hold(account_id: str, hold_id: str, *, repository: BillingRepository) -> bool:
    """Give back a hold no job will turn into usage; False when it was already gone."""
    released = await repository.release_hold(account_id, hold_id)
    log.info("quota_hold_released" if released else "quota_hold_already_gone", hold_id=hold_id)
    return released


async def usage(
    account_id: str, now: datetime, *, repository: BillingRepository, settings: BillingSettings
) -> UsageReport:
    """Characters used in the account's current Stripe period (calendar month without one)."""
    subscription = await repository.subscription_for_account(account_id)
    period = current_period(subscription, now, billing_enabled=settings.enabled)
    used, jobs = await repository.usage_between(account_id, period.start, period.end)
    quota = settings.plan_character_quota
    return UsageReport(period.start, period.end, used, quota, max(quota - used, 0), jobs)


async def check_quota(
    account_id: str,
    characters: int,
    *,
    repository: BillingRepository,
    settings: BillingSettings,
    now: datetime | None = None,
    reserve: bool = False,
) -> QuotaDecision:
    """Whether `characters` more fit the account's quota this period (always with BILLING=off), counting the
    characters held for requests still in flight; with `reserve`, an allowed answer holds them too."""
    moment = now or datetime.now(UTC)
    subscription = await repository.subscription_for_account(account_id)
    period = current_period(subscription, moment, billing_enabled=settings.enabled)
    # Check and hold under the account's lock: a burst of requests is decided one by one, each seeing the
    # holds of those before it, so together they never pass more than the quota.
    async with repository.quota_transaction(account_id) as tx:
        used, held = await tx.committed_characters(period.start, period.end, moment)
        decision = decide_quota(
            used=used + held,
            requested=characters,
            quota=settings.plan_character_quota,
            billing_enabled=settings.enabled,
            subscription_status=subscription.status if subscription else None,
        )
        if not decision.allowed:
            metrics.QUOTA_REFUSALS.inc()
        hold_id = None
        # With billing off nothing is enforced, so nothing needs holding.
        if reserve and decision.allowed and settings.enabled:
            hold_id = str(uuid.uuid4())
            await tx.drop_expired_holds(moment)
            await tx.add_hold(hold_id, characters, moment, moment + timedelta(seconds=settings.quota_hold_ttl_s))
    if hold_id is not None:
        log.info("quota_hold_taken", hold_id=hold_id, characters=characters, held_before=held)
    return QuotaDecision(decision.allowed, decision.remaining, decision.reason, period, hold_id)
