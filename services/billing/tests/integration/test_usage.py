"""Usage ledger and quota against real PostgreSQL: once per job, per real billing period, across restarts."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from timbre_billing import handlers
from timbre_billing.adapters.repository import BillingRepository
from timbre_billing.domain import SubscriptionSnapshot
from timbre_billing.settings import BillingSettings
from timbre_common.db import create_pool

PERIOD_START = datetime(2026, 3, 17, 9, 30, tzinfo=UTC)  # mid-month, so a calendar month would differ
PERIOD_END = datetime(2026, 4, 17, 9, 30, tzinfo=UTC)


async def _subscribe(repo: BillingRepository, account_id: str, status: str = "active") -> None:
    async with repo.transaction() as tx:
        await tx.upsert_customer("cus_u1", "ada@example.com")
        await tx.assign_account("cus_u1", account_id)
        await tx.save_subscription(
            SubscriptionSnapshot("sub_u1", "cus_u1", status, PERIOD_START, PERIOD_END), event_created=1
        )


async def test_same_job_counted_once_and_after_restart(
    repository: BillingRepository, settings_on: BillingSettings, schema: str, database_url: str
) -> None:
    at = datetime(2026, 3, 20, tzinfo=UTC)
    kw = {"repository": repository, "settings": settings_on}
    assert await handlers.record_usage("job-1", "acct_1", 120, at, **kw)
    assert not await handlers.record_usage("job-1", "acct_1", 120, at, **kw)
    # A "restart": a new pool and repository over the same schema.
    pool2 = await create_pool(database_url, schema=schema, min_size=1, max_size=1)
    try:
        repo2 = BillingRepository(pool2)
        kw2 = {"repository": repo2, "settings": settings_on}
        assert not await handlers.record_usage("job-1", "acct_1", 120, at, **kw2)
        assert await handlers.record_usage("job-2", "acct_1", 30, at, repository=repo2, settings=settings_on)
        report = await handlers.usage("acct_1", at, repository=repo2, settings=settings_on)
    finally:
        await pool2.close()
    assert report.characters_used == 150 and report.remaining == 850 and report.quota == 1000


async def test_usage_summed_over_the_real_stripe_period(
    repository: BillingRepository, settings_on: BillingSettings, pool: asyncpg.Pool
) -> None:
    await _subscribe(repository, "acct_p")
    kw = {"repository": repository, "settings": settings_on}
    await handlers.record_usage("before", "acct_p", 400, PERIOD_START - timedelta(seconds=1), **kw)
    await handlers.record_usage("first", "acct_p", 100, PERIOD_START, **kw)
    await handlers.record_usage("inside", "acct_p", 200, datetime(2026, 4, 2, tzinfo=UTC), **kw)
    await handlers.record_usage("after", "acct_p", 800, PERIOD_END, **kw)
    await handlers.record_usage("other", "acct_other", 50, datetime(2026, 4, 2, tzinfo=UTC), **kw)
    report = await handlers.usage("acct_p", datetime(2026, 4, 10, tzinfo=UTC), **kw)
    assert (report.period_start, report.period_end) == (PERIOD_START, PERIOD_END)
    assert report.characters_used == 300 and report.remaining == 700
    assert report.jobs == 2  # "first" and "inside"; the others fall outside the period or the account
    stamped = await pool.fetchval("SELECT period_start FROM usage_ledger WHERE job_id = 'inside'")
    assert stamped == PERIOD_START


async def test_quota_at_and_past_the_limit(
    repository: BillingRepository, settings_on: BillingSettings
) -> None:
    await _subscribe(repository, "acct_q")
    now = datetime(2026, 4, 1, tzinfo=UTC)
    kw = {"repository": repository, "settings": settings_on}
    await handlers.record_usage("j1", "acct_q", 990, now, **kw)
    at_limit = await handlers.check_quota("acct_q", 10, now=now, **kw)
    assert (at_limit.allowed, at_limit.remaining, at_limit.reason) == (True, 10, "ok")
    past = await handlers.check_quota("acct_q", 11, now=now, **kw)
    assert (past.allowed, past.remaining, past.reason) == (False, 10, "quota_exceeded")
    await handlers.record_usage("j2", "acct_q", 10, now, **kw)
    full = await handlers.check_quota("acct_q", 1, now=now, **kw)
    assert (full.allowed, full.remaining) == (False, 0)
    # The next Stripe period starts afresh.
    fresh = await handlers.check_quota("acct_q", 1000, now=PERIOD_END + timedelta(days=1), **kw)
    assert fresh.allowed and fresh.remaining == 1000


async def test_no_subscription_is_refused_when_billing_is_on(
    repository: BillingRepository, settings_on: BillingSettings
) -> None:
    decision = await handlers.check_quota("acct_none", 1, repository=repository, settings=settings_on)
    assert (decision.allowed, decision.reason) == (False, "no_subscription")


async def test_billing_off_allows_but_counts(
    repository: BillingRepository, settings_off: BillingSettings
) -> None:
    now = datetime(2026, 5, 20, tzinfo=UTC)
    kw = {"repository": repository, "settings": settings_off}
    await handlers.record_usage("big", "acct_local", 1500, now, **kw)
    await handlers.record_usage("last-month", "acct_local", 7, datetime(2026, 4, 30, tzinfo=UTC), **kw)
    decision = await handlers.check_quota("acct_local", 100, now=now, **kw)
    assert (decision.allowed, decision.remaining, decision.reason) == (True, 0, "billing_off")
    report = await handlers.usage("acct_local", now, **kw)
    assert report.characters_used == 1500
    assert (report.period_start, report.period_end) == (
        datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC)
    )
