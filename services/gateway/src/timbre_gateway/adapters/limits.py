"""Per-key rate (GCRA) and concurrency (leases with a TTL) limits in Redis, shared by all replicas; while Redis
is unreachable the same limits hold per process (LocalLimiter), so an outage never turns every limit off."""
from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from timbre_common.logging import get_logger

log = get_logger(__name__)

# The steps every script shares, as Lua functions, so the arithmetic is written once. Redis' own clock (`now`,
# in ms) is used so that replicas with skewed clocks agree.
_LIB = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- GCRA: one theoretical-arrival-time per key. `limit` requests may burst, then one every period/limit.
-- {allowed, wait ms, remaining}
local function gcra(key, interval, period)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period
  if now < allow_at then
    return {0, allow_at - now, 0}
  end
  redis.call('SET', key, new_tat, 'PX', math.max(1, new_tat - now))
  return {1, 0, math.floor((now + period - new_tat) / interval)}
end

-- Concurrency: a sorted set of leases scored by expiry, so a crashed replica's leases lapse by themselves.
-- {taken, held}
local function acquire(key, limit, ttl, token)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local held = redis.call('ZCARD', key)
  if held >= limit then
    return {0, held}
  end
  redis.call('ZADD', key, now + ttl, token)
  redis.call('PEXPIRE', key, ttl)
  return {1, held + 1}
end
"""

_GCRA = _LIB + "return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))"

_ACQUIRE = _LIB + "return acquire(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])"

_RENEW = _LIB + """
local ttl = tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# Both at once, one round trip per request: the rate first (a refused request takes no slot), then a slot.
# {allowed, wait ms, remaining, taken, held}
_ADMIT = _LIB + """
local rate = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if rate[1] == 0 then
  return {0, rate[2], 0, 0, 0}
end
local slot = acquire(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
return {1, 0, rate[3], slot[1], slot[2]}
"""

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float


@dataclass(frozen=True)
class Lease:
    """An in-flight request's slot; `local` when it was taken from the per-process fallback."""

    key: str
    token: str | None
    limit: int
    held: int
    local: bool = False


class LocalLimiter:
    """The same GCRA and leases in this process's memory: the fallback while Redis is down. With several
    replicas each enforces the limit on its own, so a key may get up to (replicas × limit) during an outage."""

    def __init__(self, *, lease_ttl_ms: int, period_ms: int, max_keys: int = 100_000,
                 clock=time.monotonic) -> None:
        self.lease_ttl_ms, self.period_ms, self.max_keys, self.clock = lease_ttl_ms, period_ms, max_keys, clock
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}

    def _now_ms(self) -> float:
        return self.clock() * 1000

    def _prune(self, now: float) -> None:
        # Keys whose budget is full again (or whose leases all lapsed) hold no information: forget them.
        if len(self._tat) > self.max_keys:
            self._tat = {k: t for k, t in self._tat.items() if t > now}
        if len(self._leases) > self.max_keys:
            self._leases = {k: {t: e for t, e in v.items() if e > now} for k, v in self._leases.items()}
            self._leases = {k: v for k, v in self._leases.items() if v}

    def hit(self, key: str, limit: int) -> RateDecision:
        """GCRA: `limit` requests may burst, then one every period/limit."""
        now = self._now_ms()
        interval = max(1, self.period_ms // limit)
        period = interval * limit
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + interval
        allow_at = new_tat - period
        if now < allow_at:
            return RateDecision(False, limit, 0, (allow_at - now) / 1000)
        self._tat[key] = new_tat
        self._prune(now)
        return RateDecision(True, limit, max(0, int((now + period - new_tat) // interval)), 0.0)

    def acquire(self, key: str, limit: int) -> Lease | None:
        now = self._now_ms()
        held = {t: e for t, e in self._leases.get(key, {}).items() if e > now}
        if len(held) >= limit:
            self._leases[key] = held
            return None
        token = uuid.uuid4().hex
        held[token] = now + self.lease_ttl_ms
        self._leases[key] = held
        self._prune(now)
        return Lease(key, token, limit, len(held), local=True)

    def renew(self, lease: Lease) -> None:
        held = self._leases.get(lease.key)
        if held is not None and lease.token in held:
            held[lease.token] = self._now_ms() + self.lease_ttl_ms

    def release(self, lease: Lease) -> None:
        held = self._leases.get(lease.key)
        if held is not None:
            held.pop(lease.token or "", None)
            if not held:
                self._leases.pop(lease.key, None)


class RedisLimiter:
    """Rate and concurrency limits per API key in Redis; while Redis is unreachable, per process (LocalLimiter),
    with a warning at most every `warn_every_s`."""

    def __init__(self, redis: Any, *, namespace: str, lease_ttl_s: float = 120.0, period_s: float = 60.0,
                 retry_down_s: float = 5.0, warn_every_s: float = 60.0, clock=time.monotonic) -> None:
        self.redis = redis
        self.namespace = namespace
        self.lease_ttl_ms = int(lease_ttl_s * 1000)
        self.period_ms = int(period_s * 1000)
        # After a failure Redis is not asked again for this long, so an outage costs no latency per request.
        self.retry_down_s = retry_down_s
        self.warn_every_s = warn_every_s
        self.clock = clock
        self.local = LocalLimiter(lease_ttl_ms=self.lease_ttl_ms, period_ms=self.period_ms, clock=clock)
        self._down_until = 0.0
        self._warned_at: float | None = None
        self._degraded_calls = 0
        self._gcra = redis.register_script(_GCRA)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._admit = redis.register_script(_ADMIT)

    def _key(self, kind: str, key_id: str) -> str:
        return f"timbre:{self.namespace}:{kind}:{key_id}"

    def _available(self) -> bool:
        if self.clock() >= self._down_until:
            return True
        self._degraded_calls += 1
        return False

    def _failed(self, op: str, exc: BaseException) -> None:
        now = self.clock()
        self._down_until = now + self.retry_down_s
        self._degraded_calls += 1
        # One line per `warn_every_s` however many requests an outage sees, with how many were limited locally.
        if self._warned_at is None or now - self._warned_at >= self.warn_every_s:
            log.warning("rate_limiter_degraded_to_local", op=op, error=type(exc).__name__,
                        limited_locally=self._degraded_calls)
            self._warned_at, self._degraded_calls = now, 0

    @property
    def degraded(self) -> bool:
        """Whether limits are currently enforced per process (Redis unreachable)."""
        return self.clock() < self._down_until

    async def hit(self, key_id: str, limit_per_minute: int) -> RateDecision:
        """Count one request against the key's per-minute budget."""
        limit = max(1, limit_per_minute)
        key = self._key("rate", f"{key_id}:{limit}")
        if not self._available():
            return self.local.hit(key, limit)
        interval = max(1, self.period_ms // limit)
        try:
            # The limit is part of the key: a changed limit starts with a full budget, not the old one's debt.
            allowed, wait_ms, remaining = await self._gcra(keys=[key], args=[interval, interval * limit])
        except _FAILURES as exc:
            self._failed("rate", exc)
            return self.local.hit(key, limit)
        return RateDecision(bool(allowed), limit, max(0, int(remaining)), int(wait_ms) / 1000)

    async def admit(self, key_id: str, limit_per_minute: int, concurrency: int) -> tuple[RateDecision, Lease | None]:
        """`hit` and then `acquire` in one round trip; no slot is taken when the rate refuses."""
        limit = max(1, limit_per_minute)
        rate_key, slots_key = self._key("rate", f"{key_id}:{limit}"), self._key("inflight", key_id)
        if self._available():
            interval = max(1, self.period_ms // limit)
            token = uuid.uuid4().hex
            try:
                allowed, wait_ms, remaining, ok, held = await self._admit(
                    keys=[rate_key, slots_key],
                    args=[interval, interval * limit, max(1, concurrency), self.lease_ttl_ms, token])
            except _FAILURES as exc:
                self._failed("admit", exc)
            else:
                decision = RateDecision(bool(allowed), limit, max(0, int(remaining)), int(wait_ms) / 1000)
                lease = Lease(slots_key, token, concurrency, int(held)) if allowed and ok else None
                return decision, lease
        decision = self.local.hit(rate_key, limit)
        return decision, self.local.acquire(slots_key, max(1, concurrency)) if decision.allowed else None

    async def acquire(self, key_id: str, limit: int) -> Lease | None:
        """A slot among the key's `limit` in-flight requests; None when all are taken."""
        key = self._key("inflight", key_id)
        if not self._available():
            return self.local.acquire(key, max(1, limit))
        token = uuid.uuid4().hex
        try:
            ok, held = await self._acquire(keys=[key], args=[max(1, limit), self.lease_ttl_ms, token])
        except _FAILURES as exc:
            self._failed("acquire", exc)
            return self.local.acquire(key, max(1, limit))
        return Lease(key, token, limit, int(held)) if ok else None

    async def renew(self, lease: Lease) -> None:
        """Push a long request's lease expiry forward."""
        if lease.local:
            self.local.renew(lease)
            return
        if lease.token is None or not self._available():
            return
        try:
            await self._renew(keys=[lease.key], args=[self.lease_ttl_ms, lease.token])
        except _FAILURES as exc:
            self._failed("renew", exc)

    async def release(self, lease: Lease) -> None:
        if lease.local:
            self.local.release(lease)
            return
        if lease.token is None:
            return
        try:
            await self.redis.zrem(lease.key, lease.token)
        except _FAILURES as exc:
            # The lease lapses on its own after its TTL.
            self._failed("release", exc)

    async def in_flight(self, key_id: str) -> int:
        """Live leases of a key (for tests and diagnostics)."""
        key = self._key("inflight", key_id)
        now_ms = int(time.time() * 1000)
        return int(await self.redis.zcount(key, now_ms, "+inf"))


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
