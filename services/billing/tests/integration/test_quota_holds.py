"""Quota holds against real PostgreSQL: a burst never passes more than the quota, job.ready turns a hold into
usage once, job.failed and a release give it back, and an expired hold stops counting."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from timbre_billing import bus_adapters, handlers
from timbre_billing.adapters.repository import BillingRepository
from timbre_billing.bootstrap import BillingDependencies
from timbre_billing.domain import SubscriptionSnapshot
from timbre_billing.settings import BillingSettings
from timbre_common.contracts import Envelope
from timbre_common.contracts.billing import CheckQuota, ReleaseHold
from timbre_common.contracts.synthesis import JobFailed, JobReady
from timbre_common.db import create_pool

PERIOD_START = datetime(2026, 3, 17, 9, 30, tzinfo=UTC)
PERIOD_END = datetime(2026, 4, 17, 9, 30, tzinfo=UTC)
NOW = datetime(2026, 4, 1, 12, 0, tzinfo=UTC)
ACCOUNT = "acct_holds"


async def _subscribe(repo: BillingRepository, account_id: str = ACCOUNT) -> None:
    async with repo.transaction() as tx:
        await tx.upsert_customer("cus_h1", "holds@example.com")
        await tx.assign_account("cus_h1", account_id)
        await tx.save_subscription(
            SubscriptionSnapshot("sub_h1", "cus_h1", "active", PERIOD_START, PERIOD_END), event_created=1
        )


def _envelope(message: object, at: datetime = NOW) -> Envelope:
    return Envelope(type=type(message).TYPE, version=1, occurred_at=at)  # type: ignore[attr-defined]


async def _holds(pool: asyncpg.Pool, account_id: str = ACCOUNT) -> list[asyncpg.Record]:
    return list(await pool.fetch("SELECT * FROM quota_holds WHERE account_id = $1", account_id))


@pytest.fixture
async def wide_pool(pool: asyncpg.Pool, database_url: str, schema: str) -> AsyncIterator[asyncpg.Pool]:
    """A second pool over the migrated schema with room for a real burst of parallel connections."""
    wide = await create_pool(database_url, schema=schema, min_size=1, max_size=12)
    yield wide
    await wide.close()


async def test_a_burst_of_reservations_never_passes_more_than_the_quota(
    wide_pool: asyncpg.Pool, settings_on: BillingSettings
) -> None:
    repository = BillingRepository(wide_pool)
    await _subscribe(repository)
    kw = {"repository": repository, "settings": settings_on, "now": NOW}
    assert await handlers.record_usage("done", ACCOUNT, 700, NOW, repository=repository, settings=settings_on)
    # 300 characters left; 40 requests of 50 arrive at once: exactly 6 fit, whatever the interleaving.
    decisions = await asyncio.gather(*(handlers.check_quota(ACCOUNT, 50, reserve=True, **kw) for _ in range(40)))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 6 and all(d.hold_id for d in allowed)
    assert len({d.hold_id for d in allowed}) == 6
    assert {d.reason for d in decisions if not d.allowed} == {"quota_exceeded"}
    assert sum(h["characters"] for h in await _holds(wide_pool)) == 300
    # Held characters count against the next request like used ones.
    after = await handlers.check_quota(ACCOUNT, 1, reserve=True, **kw)
    assert (after.allowed, after.remaining, after.hold_id) == (False, 0, None)


async def test_the_rpc_reserves_only_when_asked(
    repository: BillingRepository, settings_on: BillingSettings, pool: asyncpg.Pool
) -> None:
    await _subscribe(repository)
    deps = BillingDependencies(settings_on, pool, repository, None)
    plain = CheckQuota(account_id=ACCOUNT, characters=400)
    reserving = CheckQuota(account_id=ACCOUNT, characters=400, reserve=True)
    assert (await bus_adapters.check_quota(plain, envelope=_envelope(plain), deps=deps)).hold_id is None
    reply = await bus_adapters.check_quota(reserving, envelope=_envelope(reserving), deps=deps)
    assert reply.allowed and reply.hold_id
    assert [h["hold_id"] for h in await _holds(pool)] == [reply.hold_id]


async def test_a_plain_check_counts_holds_but_takes_none(
    repository: BillingRepository, settings_on: BillingSettings, pool: asyncpg.Pool
) -> None:
    await _subscribe(repository)
    kw = {"repository": repository, "settings": settings_on, "now": NOW}
    held = await handlers.check_quota(ACCOUNT, 600, reserve=True, **kw)
    assert held.allowed and held.remaining == 1000
    check = await handlers.check_quota(ACCOUNT, 401, **kw)
    assert (check.allowed, check.remaining, check.hold_id) == (False, 400, None)
    assert len(await _holds(pool)) == 1


async def test_job_ready_turns_the_hold_into_usage_once(
    repository: BillingRepository, settings_on: BillingSettings, pool: asyncpg.Pool
) -> None:
    await _subscribe(repository)
    deps = BillingDependencies(settings_on, pool, repository, None)
    kw = {"repository": repository, "settings": settings_on, "now": NOW}
    hold = await handlers.check_quota(ACCOUNT, 400, reserve=True, **kw)
    assert hold.allowed and hold.hold_id
    ready = JobReady(job_id="job-r", account_id=ACCOUNT, voice_id="v", backend="embedded", characters=400,
                     audio_key="generations/r.wav", hold_id=hold.hold_id)
    for _ in range(3):  # delivered, then redelivered twice
        await bus_adapters.on_job_ready(ready, envelope=_envelope(ready), deps=deps)
    assert await _holds(pool) == []
    report = await handlers.usage(ACCOUNT, NOW, repository=repository, settings=settings_on)
    assert (report.characters_used, report.jobs) == (400, 1)
    # Counted once, as usage only: 600 left, not 200 (both) nor 1000 (neither).
    assert (await handlers.check_quota(ACCOUNT, 600, **kw)).allowed
    assert not (await handlers.check_quota(ACCOUNT, 601, **kw)).allowed


async def test_job_failed_and_a_release_give_the_hold_back(
    repository: BillingRepository, settings_on: BillingSettings, pool: asyncpg.Pool
) -> None:
    await _subscribe(repository)
    deps = BillingDependencies(settings_on, pool, repository, None)
    kw = {"repository": repository, "settings": settings_on, "now": NOW}
    failing = await handlers.check_quota(ACCOUNT, 700, reserve=True, **kw)
    assert not (await handlers.check_quota(ACCOUNT, 301, **kw)).allowed
    failed = JobFailed(job_id="job-f", account_id=ACCOUNT, code="worker_crashed", reason="boom",
                       hold_id=failing.hold_id)
    for _ in range(2):
        await bus_adapters.on_job_failed(failed, envelope=_envelope(failed), deps=deps)
    assert await _holds(pool) == []
    # A cache hit's hold, released by the gateway over RPC; a second release is a no-op.
    cached = await handlers.check_quota(ACCOUNT, 1000, reserve=True, **kw)
    assert cached.allowed and cached.hold_id
    release = ReleaseHold(account_id=ACCOUNT, hold_id=cached.hold_id)
    assert await bus_adapters.release_hold(release, envelope=_envelope(release), deps=deps) is None
    assert not await handlers.release_hold(ACCOUNT, cached.hold_id, repository=repository)
    # Another account cannot release it either (it is gone anyway, and ids are scoped to their account).
    mine = await handlers.check_quota(ACCOUNT, 10, reserve=True, **kw)
    assert not await handlers.release_hold("acct_other", mine.hold_id or "", repository=repository)
    report = await handlers.usage(ACCOUNT, NOW, repository=repository, settings=settings_on)
    assert report.characters_used == 0
    assert (await handlers.check_quota(ACCOUNT, 990, **kw)).allowed


async def test_an_expired_hold_stops_counting(
    repository: BillingRepository, settings_on: BillingSettings, pool: asyncpg.Pool
) -> None:
    await _subscribe(repository)
    kw = {"repository": repository, "settings": settings_on}
    ttl = timedelta(seconds=settings_on.quota_hold_ttl_s)
    lost = await handlers.check_quota(ACCOUNT, 900, reserve=True, now=NOW, **kw)
    assert lost.allowed
    assert not (await handlers.check_quota(ACCOUNT, 200, now=NOW + ttl - timedelta(seconds=1), **kw)).allowed
    later = await handlers.check_quota(ACCOUNT, 200, reserve=True, now=NOW + ttl, **kw)
    assert later.allowed and later.remaining == 1000
    # The reservation also swept the expired hold away.
    assert [h["hold_id"] for h in await _holds(pool)] == [later.hold_id]


async def test_billing_off_allows_without_holding(
    repository: BillingRepository, settings_off: BillingSettings, pool: asyncpg.Pool
) -> None:
    decisions = await asyncio.gather(*(handlers.check_quota(ACCOUNT, 5000, reserve=True, now=NOW,
                                                            repository=repository, settings=settings_off)
                                       for _ in range(5)))
    assert all(d.allowed and d.hold_id is None for d in decisions)
    assert await _holds(pool) == []


async def test_a_purge_removes_the_accounts_holds(
    repository: BillingRepository, settings_on: BillingSettings, pool: asyncpg.Pool
) -> None:
    await _subscribe(repository)
    await handlers.check_quota(ACCOUNT, 100, reserve=True, now=NOW, repository=repository, settings=settings_on)
    await repository.delete_account(ACCOUNT)
    assert await _holds(pool) == []


async def test_refusals_and_open_holds_show_in_the_metrics(pool: asyncpg.Pool, settings_on: BillingSettings) -> None:
    from prometheus_client import REGISTRY

    repository = BillingRepository(pool)
    await _subscribe(repository)
    kw = {"repository": repository, "settings": settings_on, "now": NOW}
    refusals = REGISTRY.get_sample_value("timbre_quota_refusals_total") or 0.0
    assert await handlers.record_usage("all", ACCOUNT, 1000, NOW, repository=repository, settings=settings_on)
    assert not (await handlers.check_quota(ACCOUNT, 1, reserve=True, **kw)).allowed
    assert not (await handlers.check_quota(ACCOUNT, 5, **kw)).allowed
    assert REGISTRY.get_sample_value("timbre_quota_refusals_total") == refusals + 2

    assert await repository.hold_stats() == (0, 0.0)
    now = datetime.now(UTC)
    async with repository.quota_transaction(ACCOUNT) as tx:
        await tx.add_hold("h-new", 10, now, now + timedelta(hours=1))
        await tx.add_hold("h-old", 10, now - timedelta(minutes=40), now + timedelta(minutes=20))
        await tx.add_hold("h-expired", 10, now - timedelta(hours=2), now - timedelta(hours=1))
    holds, oldest_s = await repository.hold_stats()
    assert holds == 2 and 40 * 60 - 5 < oldest_s < 40 * 60 + 60
