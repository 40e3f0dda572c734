"""Pure billing rules: periods, quota, ordering, Stripe object parsing."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from timbre_billing.domain import (
    InvalidEmail,
    StoredSubscription,
    calendar_month,
    current_period,
    decide_quota,
    normalize_email,
    subscription_from_stripe,
    subscription_update_verdict,
)

T0 = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


def _sub(
    status: str = "active", last: int = 100, start: datetime | None = T0, days: int = 30
) -> StoredSubscription:
    end = start + timedelta(days=days) if start else None
    return StoredSubscription("sub_1", "cus_1", status, start, end, last)


def test_calendar_month_including_december() -> None:
    assert calendar_month(T0).start == datetime(2026, 3, 1, tzinfo=UTC)
    dec = calendar_month(datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
    assert (dec.start, dec.end) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def test_period_follows_subscription_and_rolls_forward_when_renewal_is_late() -> None:
    sub = _sub()
    assert current_period(sub, T0 + timedelta(days=3), billing_enabled=True).start == T0
    late = current_period(sub, T0 + timedelta(days=65), billing_enabled=True)
    assert (late.start, late.end) == (T0 + timedelta(days=60), T0 + timedelta(days=90))
    assert current_period(sub, T0, billing_enabled=False) == calendar_month(T0)
    assert current_period(None, T0, billing_enabled=True) == calendar_month(T0)


def test_quota_allows_up_to_the_limit_and_refuses_past_it() -> None:
    at = decide_quota(used=990, requested=10, quota=1000, billing_enabled=True, subscription_status="active")
    past = decide_quota(
        used=990, requested=11, quota=1000, billing_enabled=True, subscription_status="active"
    )
    assert (at.allowed, at.remaining, at.reason) == (True, 10, "ok")
    assert (past.allowed, past.remaining, past.reason) == (False, 10, "quota_exceeded")
    off = decide_quota(used=5000, requested=1, quota=1000, billing_enabled=False, subscription_status=None)
    assert (off.allowed, off.remaining, off.reason) == (True, 0, "billing_off")
    unpaid = decide_quota(used=0, requested=1, quota=1000, billing_enabled=True, subscription_status="unpaid")
    assert (unpaid.allowed, unpaid.reason) == (False, "subscription_unpaid")


def test_update_ordering() -> None:
    assert subscription_update_verdict(None, 5) == "apply"
    assert subscription_update_verdict(_sub(last=100), 100) == "apply"
    assert subscription_update_verdict(_sub(last=100), 99) == "stale"
    assert subscription_update_verdict(_sub("canceled", last=100), 200) == "after_cancel"


def test_subscription_periods_from_items_or_top_level() -> None:
    new_api = {"id": "sub_1", "customer": "cus_1", "status": "active",
               "items": {"data": [{"current_period_start": 1_700_000_000,
                                   "current_period_end": 1_702_592_000}]}}
    old_api = {"id": "sub_1", "customer": {"id": "cus_1"}, "status": "past_due",
               "current_period_start": 1_700_000_000, "current_period_end": 1_702_592_000}
    for obj in (new_api, old_api):
        snap = subscription_from_stripe(obj)
        assert snap.customer_id == "cus_1"
        assert snap.current_period_start == datetime.fromtimestamp(1_700_000_000, UTC)
        assert snap.current_period_end == datetime.fromtimestamp(1_702_592_000, UTC)


def test_email_normalised_and_checked() -> None:
    assert normalize_email("  Ada@Example.COM ") == "ada@example.com"
    for bad in ("", "ada", "ada@", "a b@example.com", "<x>@example.com"):
        with pytest.raises(InvalidEmail):
            normalize_email(bad)
