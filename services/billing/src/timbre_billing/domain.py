"""Billing rules without I/O: periods, quota decisions, subscription ordering, Stripe object parsing."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

# Statuses in which the customer keeps service; `past_due` is Stripe's retry window, still served.
SERVED_STATUSES = frozenset({"active", "trialing", "past_due"})
# Statuses after which the API key must stop working.
REVOKING_STATUSES = frozenset({"unpaid"})
CANCELED = "canceled"
_EMAIL_RE = re.compile(r"^[^@\s<>\"']{1,64}@[^@\s<>\"']{1,253}\.[^@\s<>\"']{1,63}$")


class BillingError(Exception):
    """Base of billing's domain errors."""


class BillingDisabled(BillingError):
    """Raised for Stripe-backed operations while BILLING=off."""


class InvalidEmail(BillingError):
    """The address given to checkout is not an email address."""


class UnknownCheckoutToken(BillingError):
    """No checkout was started with this token."""


@dataclass(frozen=True, slots=True)
class BillingPeriod:
    """A half-open interval [start, end) over which usage is summed."""

    start: datetime
    end: datetime

    def contains(self, moment: datetime) -> bool:
        """Whether `moment` falls in this period."""
        return self.start <= moment < self.end


@dataclass(frozen=True, slots=True)
class SubscriptionSnapshot:
    """The parts of a Stripe subscription billing keeps."""

    subscription_id: str
    customer_id: str
    status: str
    current_period_start: datetime | None
    current_period_end: datetime | None
    canceled_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    """A subscription row as billing last applied it."""

    subscription_id: str
    customer_id: str
    status: str
    current_period_start: datetime | None
    current_period_end: datetime | None
    last_event_created: int


@dataclass(frozen=True, slots=True)
class StripeEvent:
    """A verified Stripe webhook event."""

    id: str
    type: str
    created: int
    object: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ProvisionAccount:
    """Ask the gateway to create (or reuse) account `account_id` and mint an API key for a paying customer."""

    account_id: str
    customer_id: str
    email: str
    checkout_token: str | None
    subscription_id: str | None
    new_account: bool


@dataclass(frozen=True, slots=True)
class RevokeAccess:
    """Ask the gateway to revoke the API keys of this customer's account."""

    customer_id: str
    account_id: str | None
    subscription_id: str
    reason: Literal["unpaid", "canceled"]


@dataclass(frozen=True, slots=True)
class RestoreAccess:
    """Ask the gateway to restore keys revoked for non-payment: the subscription is served again."""

    customer_id: str
    account_id: str | None
    subscription_id: str


@dataclass(frozen=True, slots=True)
class WebhookOutcome:
    """What one webhook delivery did; `provision`/`revoke` are for the caller to publish."""

    event_id: str
    event_type: str
    outcome: Literal["applied", "stale", "ignored"]
    duplicate: bool = False
    provision: ProvisionAccount | None = None
    revoke: RevokeAccess | None = None
    restore: RestoreAccess | None = None


@dataclass(frozen=True, slots=True)
class CheckoutStart:
    """Where to send the browser after POST /v1/checkout."""

    url: str
    already_subscribed: bool
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class CheckoutStatus:
    """Success-page poll: `paid` once the webhook landed, with the account billing assigned to it."""

    paid: bool
    account_id: str | None = None
    customer_id: str | None = None
    email: str | None = None


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Characters used in the current period against the plan quota."""

    period_start: datetime
    period_end: datetime
    characters_used: int
    quota: int
    remaining: int
    jobs: int = 0


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """Whether a synthesis of some characters may run; `remaining` is before this request."""

    allowed: bool
    remaining: int
    reason: str
    period: BillingPeriod | None = field(default=None, compare=False)
    # The hold that reserves the characters, when reserved (allowed, billing on).
    hold_id: str | None = field(default=None, compare=False)


def normalize_email(email: str) -> str:
    """A trimmed, lower-cased email; raises InvalidEmail when it is not one."""
    value = email.strip().lower()
    if len(value) > 254 or not _EMAIL_RE.match(value):
        raise InvalidEmail("not a valid email address")
    return value


def calendar_month(now: datetime) -> BillingPeriod:
    """The UTC calendar month holding `now`."""
    now = now.astimezone(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        return BillingPeriod(start, start.replace(year=start.year + 1, month=1))
    end = start.replace(month=start.month + 1)
    return BillingPeriod(start, end)


def current_period(
    subscription: StoredSubscription | None, now: datetime, *, billing_enabled: bool
) -> BillingPeriod:
    """The Stripe billing window holding `now`, or the calendar month without one."""
    if not billing_enabled or subscription is None:
        return calendar_month(now)
    start, end = subscription.current_period_start, subscription.current_period_end
    if start is None or end is None or end <= start:
        return calendar_month(now)
    if now < start:
        return BillingPeriod(start, end)
    # A renewal webhook not yet applied: step forward by the known length until `now` is covered.
    length = end - start
    if now >= end:
        steps = (now - start) // length
        start, end = start + steps * length, start + (steps + 1) * length
    return BillingPeriod(start, end)


def decide_quota(
    *, used: int, requested: int, quota: int, billing_enabled: bool, subscription_status: str | None
) -> QuotaDecision:
    """Allow up to and including the quota; with billing off, always allow."""
    remaining = max(quota - used, 0)
    if not billing_enabled:
        return QuotaDecision(True, remaining, "billing_off")
    if subscription_status is None:
        return QuotaDecision(False, remaining, "no_subscription")
    if subscription_status not in SERVED_STATUSES:
        return QuotaDecision(False, remaining, f"subscription_{subscription_status}")
    if used + requested > quota:
        return QuotaDecision(False, remaining, "quota_exceeded")
    return QuotaDecision(True, remaining, "ok")


def subscription_update_verdict(
    stored: StoredSubscription | None, event_created: int
) -> Literal["apply", "stale", "after_cancel"]:
    """Whether an `updated` event may change a subscription: never after cancel, never backwards in time."""
    if stored is None:
        return "apply"
    if stored.status == CANCELED:
        return "after_cancel"
    if event_created < stored.last_event_created:
        return "stale"
    return "apply"


def _ts(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), tz=UTC) if isinstance(value, int | float) and value else None


def _id(value: Any) -> str | None:
    # Stripe fields are an id, or the object itself when expanded.
    if isinstance(value, Mapping):
        return str(value.get("id")) if value.get("id") else None
    return str(value) if value else None


def subscription_from_stripe(obj: Mapping[str, Any]) -> SubscriptionSnapshot:
    """Parse a Stripe subscription object; periods sit on items since API 2025-03-31, at the top before."""
    start, end = obj.get("current_period_start"), obj.get("current_period_end")
    items = obj.get("items")
    data = items.get("data") if isinstance(items, Mapping) else None
    if data:
        starts = [i.get("current_period_start") for i in data if i.get("current_period_start")]
        ends = [i.get("current_period_end") for i in data if i.get("current_period_end")]
        if starts and ends:
            start, end = min(starts), max(ends)
    customer_id = _id(obj.get("customer"))
    if not obj.get("id") or not customer_id:
        raise ValueError("subscription object without id or customer")
    return SubscriptionSnapshot(
        subscription_id=str(obj["id"]),
        customer_id=customer_id,
        status=str(obj.get("status") or "incomplete"),
        current_period_start=_ts(start),
        current_period_end=_ts(end),
        canceled_at=_ts(obj.get("ended_at") or obj.get("canceled_at")),
    )


def checkout_session_fields(
    obj: Mapping[str, Any],
) -> tuple[str | None, str | None, str | None, str | None, bool]:
    """(customer_id, email, checkout token, subscription_id, paid) from a Checkout Session object."""
    details = obj.get("customer_details")
    email = (details.get("email") if isinstance(details, Mapping) else None) or obj.get("customer_email")
    metadata = obj.get("metadata")
    token = obj.get("client_reference_id") or (
        metadata.get("checkout_token") if isinstance(metadata, Mapping) else None
    )
    # Delayed payment methods complete the session unpaid; async_payment_succeeded follows.
    paid = obj.get("payment_status") in ("paid", "no_payment_required")
    return _id(obj.get("customer")), email, token, _id(obj.get("subscription")), paid


def outcome_actions(outcome: WebhookOutcome) -> dict[str, Any]:
    """The outcome's requests as JSON, kept with the event so a redelivery re-emits them."""
    return {
        "provision": asdict(outcome.provision) if outcome.provision else None,
        "revoke": asdict(outcome.revoke) if outcome.revoke else None,
        "restore": asdict(outcome.restore) if outcome.restore else None,
    }


def outcome_from_actions(event: StripeEvent, outcome: str, actions: Mapping[str, Any]) -> WebhookOutcome:
    """Rebuild a stored outcome for a redelivered event."""
    provision = actions.get("provision")
    revoke = actions.get("revoke")
    restore = actions.get("restore")
    return WebhookOutcome(
        event_id=event.id,
        event_type=event.type,
        outcome=cast(Literal["applied", "stale", "ignored"], outcome),
        duplicate=True,
        provision=ProvisionAccount(**provision) if provision else None,
        revoke=RevokeAccess(**revoke) if revoke else None,
        restore=RestoreAccess(**restore) if restore else None,
    )

