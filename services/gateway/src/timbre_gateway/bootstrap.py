"""Wiring of the gateway: pool, migrations, bus, event consumers, the HTTP server."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import uvicorn

from timbre_common.contracts.accounts import AccountPurged, AccountPurgeRequested
from timbre_common.contracts.billing import AccountKeysRestored, AccountKeysRevoked, AccountProvisioningRequested
from timbre_common.contracts.synthesis import WorkerHeartbeat
from timbre_common.db import create_pool, migrate
from timbre_common.messaging import QUEUES, Bus, PgDeduper

from . import handlers
from .adapters.backends import BackendRegistry
from .adapters.repository import AccountRepository
from .http.app import create_app
from .settings import GatewaySettings

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


@dataclass
class GatewayContext:
    """What route handlers reach through `request.app.state.ctx`."""

    settings: GatewaySettings
    bus: Bus
    pool: Any
    accounts: AccountRepository
    backends: BackendRegistry
    extras: dict[str, Any]


class GatewayService:
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.app = create_app(ctx)
        self._server: uvicorn.Server | None = None
        self._serve_task: asyncio.Task[None] | None = None

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
        config = uvicorn.Config(self.app, host=ctx.settings.host, port=ctx.settings.port, log_config=None,
                                access_log=False, lifespan="off", server_header=False)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._serve_task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._serve_task.done():
                self._serve_task.result()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._serve_task is not None:
            await self._serve_task
        await self.ctx.bus.close()
        await self.ctx.pool.close()


async def build_context(settings: GatewaySettings) -> GatewayContext:
    pool = await create_pool(settings.database_url.get_secret_value(), schema=settings.db_schema)
    await migrate(pool, settings.db_schema, MIGRATIONS)
    bus = await Bus(url=settings.amqp_url.get_secret_value(), namespace=settings.bus_namespace,
                    service="gateway", rpc_timeout=settings.rpc_timeout_s).connect()
    return GatewayContext(settings=settings, bus=bus, pool=pool, accounts=AccountRepository(pool),
                          backends=BackendRegistry(grace=settings.heartbeat_grace), extras={})


async def build(settings: GatewaySettings | None = None) -> GatewayService:
    return GatewayService(await build_context(settings or GatewaySettings()))
