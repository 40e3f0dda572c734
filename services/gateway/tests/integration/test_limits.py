"""RedisLimiter against a real Redis: GCRA rate, concurrency leases with a TTL, failing open."""
from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from timbre_gateway.adapters.limits import LocalLimiter, RedisLimiter


@pytest.fixture
async def redis(redis_url: str):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def _cleanup(redis, namespace: str) -> None:
    keys = [k async for k in redis.scan_iter(match=f"timbre:{namespace}:*")]
    if keys:
        await redis.delete(*keys)


async def test_rate_allows_the_burst_then_refuses_with_a_wait(redis, namespace):
    limiter = RedisLimiter(redis, namespace=namespace)
    key = str(uuid.uuid4())
    decisions = [await limiter.hit(key, 5) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    # One request is earned back every 60/5 = 12 s.
    assert 10.0 < decisions[5].retry_after_s <= 12.0
    # Another key has its own budget.
    assert (await limiter.hit(str(uuid.uuid4()), 5)).allowed
    await _cleanup(redis, namespace)


async def test_rate_is_shared_by_two_limiters_like_two_replicas(redis, namespace):
    a, b = RedisLimiter(redis, namespace=namespace), RedisLimiter(redis, namespace=namespace)
    key = str(uuid.uuid4())
    results = await asyncio.gather(*[(a if i % 2 else b).hit(key, 4) for i in range(10)])
    assert sum(d.allowed for d in results) == 4
    await _cleanup(redis, namespace)


async def test_rate_refills_over_time(redis, namespace):
    # A 1 s period with 2 requests: one earned back every 0.5 s.
    limiter = RedisLimiter(redis, namespace=namespace, period_s=1.0)
    key = str(uuid.uuid4())
    assert (await limiter.hit(key, 2)).allowed and (await limiter.hit(key, 2)).allowed
    refused = await limiter.hit(key, 2)
    assert not refused.allowed
    await asyncio.sleep(refused.retry_after_s + 0.05)
    assert (await limiter.hit(key, 2)).allowed
    await _cleanup(redis, namespace)


async def test_concurrency_slots_are_taken_and_given_back(redis, namespace):
    limiter = RedisLimiter(redis, namespace=namespace)
    key = str(uuid.uuid4())
    first, second = await limiter.acquire(key, 2), await limiter.acquire(key, 2)
    assert first and second and first.token != second.token
    assert await limiter.acquire(key, 2) is None
    assert await limiter.in_flight(key) == 2
    await limiter.release(first)
    third = await limiter.acquire(key, 2)
    assert third is not None
    await limiter.release(second)
    await limiter.release(third)
    assert await limiter.in_flight(key) == 0
    await _cleanup(redis, namespace)


async def test_admit_counts_the_rate_and_takes_a_slot_in_one_call(redis, namespace):
    limiter = RedisLimiter(redis, namespace=namespace)
    key = str(uuid.uuid4())
    first, second = await limiter.admit(key, 3, 1), await limiter.admit(key, 3, 1)
    assert first[0].allowed and first[1] is not None and first[0].remaining == 2
    # Within the rate but every slot taken: no lease (the route answers too_many_concurrent_requests).
    assert second[0].allowed and second[1] is None
    await limiter.release(first[1])
    third = await limiter.admit(key, 3, 1)
    assert third[1] is not None and await limiter.in_flight(key) == 1
    # Past the rate: refused with a wait, and no slot taken.
    await limiter.release(third[1])
    refused, lease = await limiter.admit(key, 3, 1)
    assert not refused.allowed and refused.retry_after_s > 0 and lease is None
    assert await limiter.in_flight(key) == 0


async def test_admit_holds_per_process_while_redis_is_down():
    unreachable = aioredis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    limiter = RedisLimiter(unreachable, namespace="down")
    decision, lease = await limiter.admit("k", 3, 1)
    assert decision.allowed and lease is not None and lease.local
    assert (await limiter.admit("k", 3, 1))[1] is None  # the one local slot is held
    limiter.local.release(lease)
    assert (await limiter.admit("k", 3, 1))[1] is not None
    assert not (await limiter.admit("k", 3, 1))[0].allowed  # the local rate of 3 is spent
    await unreachable.aclose()


async def test_a_crashed_replicas_lease_lapses(redis, namespace):
    """A replica that dies never releases; its lease expires after the TTL and frees the slot."""
    dead_replica = RedisLimiter(redis, namespace=namespace, lease_ttl_s=0.3)
    key = str(uuid.uuid4())
    assert await dead_replica.acquire(key, 1) is not None
    live = RedisLimiter(redis, namespace=namespace, lease_ttl_s=0.3)
    assert await live.acquire(key, 1) is None
    await asyncio.sleep(0.4)
    lease = await live.acquire(key, 1)
    assert lease is not None
    await live.release(lease)
    await _cleanup(redis, namespace)


async def test_renew_keeps_a_long_request_holding_its_slot(redis, namespace):
    limiter = RedisLimiter(redis, namespace=namespace, lease_ttl_s=0.4)
    key = str(uuid.uuid4())
    lease = await limiter.acquire(key, 1)
    for _ in range(3):
        await asyncio.sleep(0.2)
        await limiter.renew(lease)
    assert await limiter.acquire(key, 1) is None
    await limiter.release(lease)
    await _cleanup(redis, namespace)


async def test_redis_down_still_limits_per_process_quickly(capsys):
    """Redis unreachable: the limits hold in this process (before: every request passed), and the degradation is
    logged once, not once per request."""
    unreachable = aioredis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    limiter = RedisLimiter(unreachable, namespace="down")
    loop = asyncio.get_running_loop()
    started = loop.time()
    decisions = [await limiter.hit("k", 1) for _ in range(200)]
    assert [d.allowed for d in decisions] == [True] + [False] * 199
    assert decisions[1].retry_after_s > 50
    assert limiter.degraded
    first, second = await limiter.acquire("k", 1), await limiter.acquire("k", 1)
    assert first is not None and first.local and second is None
    await limiter.renew(first)
    await limiter.release(first)
    third = await limiter.acquire("k", 1)
    assert third is not None
    await limiter.release(third)
    # Only the first call pays for the failed connection; the next ones skip Redis for a while.
    assert loop.time() - started < 1.5
    warnings = [line for line in capsys.readouterr().out.splitlines() if "rate_limiter_degraded_to_local" in line]
    assert len(warnings) == 1, warnings
    await unreachable.aclose()


def test_local_limiter_refills_and_forgets_full_budgets():
    now = [1000.0]
    local = LocalLimiter(lease_ttl_ms=1000, period_ms=1000, max_keys=2, clock=lambda: now[0])
    assert [local.hit("a", 2).allowed for _ in range(3)] == [True, True, False]
    now[0] += 0.5
    assert local.hit("a", 2).allowed and not local.hit("a", 2).allowed
    for k in ("b", "c", "d"):
        local.hit(k, 2)
    now[0] += 10
    local.hit("e", 2)
    assert set(local._tat) == {"e"}
    lease = local.acquire("x", 1)
    assert lease is not None and local.acquire("x", 1) is None
    now[0] += 2  # a lease never released lapses after its TTL
    assert local.acquire("x", 1) is not None
