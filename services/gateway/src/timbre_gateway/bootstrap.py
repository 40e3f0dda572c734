"""Wiring of the gateway: pool, migrations, bus, event consumers, the HTTP server."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from timbre_common.contracts.accounts import AccountPurged, AccountPurgeRequested
from timbre_common.contracts.billing import AccountKeysRestored, AccountKeysRevoked, AccountProvisioningRequested
from timbre_common.contracts.synthesis import WorkerHeartbeat
from timbre_common.db import create_pool, migrate
from timbre_common.logging import get_logger
from timbre_common.messaging import QUEUES, Bus, PgDeduper
from timbre_common.runtime import HttpServer

from . import handlers
from .adapters.backends import BackendRegistry
from .adapters.idempotency import IdempotencyStore
from .adapters.limits import RedisLimiter
from .adapters.repository import AccountRepository
from .adapters.stream_relay import StreamRelay, StreamTimeouts
from .http.app import create_app
from .settings import GatewaySettings

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
log = get_logger(__name__)


@dataclass
class GatewayContext:
    """What route handlers reach through `request.app.state.ctx`."""

    settings: GatewaySettings
    bus: Bus
    pool: Any
    accounts: AccountRepository
    backends: BackendRegistry
    extras: dict[str, Any]
    redis: Any = None
    limiter: RedisLimiter | None = None
    idempotency: IdempotencyStore | None = None
    # This instance's relay of streamed audio (None in tests that stream nothing).
    streams: StreamRelay | None = None


class GatewayService:
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.app = create_app(ctx)
        self._server: HttpServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        ctx = self.ctx
        deduper = PgDeduper(ctx.pool)
        await deduper.ensure()
        deps = {"accounts": ctx.accounts}
        await ctx.bus.consume(QUEUES["gateway.events"], {
            AccountPurgeRequested: partial(handlers.on_purge_requested, bus=ctx.bus, **deps),
            AccountPurged: partial(handlers.on_purged, **deps),
            AccountProvisioningRequested: partial(handlers.on_provisioning_requested, **deps),
            AccountKeysRevoked: partial(handlers.on_keys_revoked, **deps),
            AccountKeysRestored: partial(handlers.on_keys_restored, **deps),
        }, deduper=deduper)
        await ctx.bus.subscribe([WorkerHeartbeat], ctx.backends.on_heartbeat)
        if ctx.streams is not None:
            await ctx.streams.start()
        self._tasks.append(asyncio.create_task(self._sweep_forever()))
        self._server = HttpServer(self.app, host=ctx.settings.host, port=ctx.settings.port)
        await self._server.start()

    async def _sweep_forever(self) -> None:
        """Expire what the gateway keeps for a while (uncollected checkout keys, idempotency records) and ask
        again for account purges some service has not confirmed."""
        settings = self.ctx.settings
        while True:
            try:
                await handlers.sweep_checkout_keys(accounts=self.ctx.accounts,
                                                   max_age_s=settings.checkout_key_ttl_s)
                await handlers.resend_unfinished_purges(accounts=self.ctx.accounts, bus=self.ctx.bus,
                                                        older_than_s=settings.gateway_sweep_interval_s)
                if self.ctx.idempotency is not None:
                    purged = await self.ctx.idempotency.purge_expired()
                    if purged:
                        log.info("idempotency_records_expired", records=purged)
            except Exception:
                log.exception("gateway_sweep_failed")
            await asyncio.sleep(settings.gateway_sweep_interval_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.stop()
        await self.ctx.bus.close()
        if self.ctx.redis is not None:
            await self.ctx.redis.aclose()
        await self.ctx.pool.close()


async def build_context(settings: GatewaySettings) -> GatewayContext:
    pool = await create_pool(settings.database_url.get_secret_value(), schema=settings.db_schema)
    await migrate(pool, settings.db_schema, MIGRATIONS)
    bus = await Bus(url=settings.amqp_url.get_secret_value(), namespace=settings.bus_namespace,
                    service="gateway", rpc_timeout=settings.rpc_timeout_s).connect()
    # Short timeouts: a Redis outage must cost a request milliseconds (the limiter then fails open), not seconds.
    redis = aioredis.from_url(settings.redis_url.get_secret_value(), socket_timeout=0.5,
                              socket_connect_timeout=0.5)
    limiter = RedisLimiter(redis, namespace=settings.bus_namespace, lease_ttl_s=settings.concurrency_lease_s)
    return GatewayContext(settings=settings, bus=bus, pool=pool, accounts=AccountRepository(pool),
                          backends=BackendRegistry(grace=settings.heartbeat_grace), extras={},
                          redis=redis, limiter=limiter, idempotency=IdempotencyStore(pool),
                          streams=StreamRelay(bus, timeouts=StreamTimeouts(
                              start_s=settings.stream_start_timeout_s, idle_s=settings.stream_idle_timeout_s,
                              gap_s=settings.stream_gap_timeout_s)))


async def build(settings: GatewaySettings | None = None) -> GatewayService:
    return GatewayService(await build_context(settings or GatewaySettings()))
