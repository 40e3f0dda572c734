"""Can the gateway reach what it needs right now: the database, the broker, and each service it calls."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from timbre_common.contracts import Ping

# The services the gateway calls on its request paths (each answers Ping from its RPC queue).
SERVICES: tuple[str, ...] = ("voices", "dispatcher", "storage", "billing")


class DependencyProbe:
    """Checks every dependency at once, at most once per `ttl_s` (load balancers poll often)."""

    def __init__(self, *, pool: Any, bus: Any, timeout_s: float = 2.0, ttl_s: float = 1.0,
                 services: tuple[str, ...] = SERVICES, clock=time.monotonic) -> None:
        self.pool = pool
        self.bus = bus
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.services = services
        self.clock = clock
        self._last: tuple[float, dict[str, str]] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> dict[str, str]:
        """{dependency: "ok" | why not}, in a stable order: database, broker, then the services."""
        async with self._lock:
            if self._last is not None and self.clock() - self._last[0] < self.ttl_s:
                return self._last[1]
            database, broker = await asyncio.gather(self._database(), self._broker())
            results = {"database": database, "broker": broker}
            if broker == "ok":
                answers = await asyncio.gather(*[self._service(s) for s in self.services])
                results.update(zip(self.services, answers, strict=True))
            else:
                results.update({s: "unreachable: broker down" for s in self.services})
            self._last = (self.clock(), results)
            return results

    async def _database(self) -> str:
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), self.timeout_s)
            return "ok"
        except Exception as exc:
            return f"down: {type(exc).__name__}"

    async def _broker(self) -> str:
        return "ok" if self.bus.connected else "down: reconnecting"

    async def _service(self, name: str) -> str:
        try:
            await self.bus.call(name, Ping(), timeout=self.timeout_s)
            return "ok"
        except Exception as exc:
            return f"down: {type(exc).__name__}"
