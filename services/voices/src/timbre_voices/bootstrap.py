"""Wiring of the voices service: pool, migrations, bus, handler table."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from timbre_common.contracts.accounts import AccountPurgeRequested
from timbre_common.contracts.voices import DeleteVoice, GetVoice, ListVoices, RegisterVoice, VoiceProfiled
from timbre_common.db import create_pool, migrate
from timbre_common.messaging import QUEUES, Bus, OutboxBus, PgDeduper, TransactionalPool

from . import handlers
from .adapters.repository import VoiceRepository
from .settings import VoicesSettings

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


class VoicesService:
    def __init__(self, settings: VoicesSettings, bus: Bus, pool: Any) -> None:
        self.settings, self.pool = settings, pool
        self.broker = bus
        # Handlers publish through the outbox: events commit with the state they announce.
        self.bus = OutboxBus(bus, pool)
        self.repo = VoiceRepository(pool)

    async def start(self) -> None:
        deps = {"repo": self.repo}
        await self.bus.ensure()
        self.bus.start()
        await self.broker.serve({
            RegisterVoice: partial(handlers.register_voice, bus=self.bus, settings=self.settings, **deps),
            ListVoices: partial(handlers.list_voices, **deps),
            GetVoice: partial(handlers.get_voice, **deps),
            DeleteVoice: partial(handlers.delete_voice, bus=self.bus, **deps),
        })
        deduper = PgDeduper(self.pool)
        await deduper.ensure()
        await self.broker.consume(QUEUES["voices.events"], {
            VoiceProfiled: partial(handlers.on_voice_profiled, **deps),
            AccountPurgeRequested: partial(handlers.on_account_purge, bus=self.bus, **deps),
        }, deduper=deduper)

    async def stop(self) -> None:
        await self.bus.stop()
        await self.broker.close()
        await self.pool.close()


async def build(settings: VoicesSettings | None = None) -> VoicesService:
    settings = settings or VoicesSettings()
    pool = TransactionalPool(await create_pool(settings.database_url.get_secret_value(), schema=settings.db_schema))
    await migrate(pool, settings.db_schema, MIGRATIONS)
    bus = await Bus(url=settings.amqp_url.get_secret_value(), namespace=settings.bus_namespace,
                    service="voices", rpc_timeout=settings.rpc_timeout_s).connect()
    return VoicesService(settings, bus, pool)
