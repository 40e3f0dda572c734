"""Wiring of the storage service: pool, migrations, bucket, bus, sweeper, and the fs URL server."""
from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from timbre_common.contracts import storage as c
from timbre_common.contracts.accounts import AccountPurgeRequested
from timbre_common.contracts.synthesis import SynthesisCompleted
from timbre_common.contracts.voices import VoiceDeleted
from timbre_common.db import create_pool, migrate
from timbre_common.logging import get_logger
from timbre_common.messaging import QUEUES, Bus, OutboxBus, PgDeduper, TransactionalPool
from timbre_common.runtime import HttpServer

from . import bus_adapters as a
from .adapters.blob import BlobStore, FsBlobStore, build_blob_store
from .adapters.http import build_http_app
from .adapters.repository import MIGRATIONS_DIR, ObjectRepository
from .settings import StorageSettings

SCHEMA = "storage"
log = get_logger(__name__)


class StorageService:
    def __init__(self, settings: StorageSettings, bus: Bus, pool: Any, store: BlobStore) -> None:
        self.settings, self.pool, self.store = settings, pool, store
        self.broker = bus
        # Handlers publish through the outbox: events commit with the state they announce.
        self.bus = OutboxBus(bus, pool)
        self.repo = ObjectRepository(pool)
        self._tasks: list[asyncio.Task[Any]] = []
        self._server: HttpServer | None = None

    async def start(self) -> None:
        d = {"repo": self.repo, "store": self.store}
        limits = self.settings.account_limits()
        await self.bus.ensure()
        self.bus.start()
        await self.broker.serve({
            c.PutVoiceReference: partial(a.put_voice_reference, limits=limits, **d),
            c.PutUpload: partial(a.put_upload, limits=limits, **d),
            c.GetUpload: partial(a.get_upload, **d),
            c.GetObject: partial(a.get_object, **d),
            c.GetRendition: partial(a.get_rendition, **d),
            c.Presign: partial(a.presign, **d),
        })
        deduper = PgDeduper(self.pool)
        await deduper.ensure()
        await self.broker.consume(QUEUES["storage.events"], {
            SynthesisCompleted: partial(a.on_synthesis_completed, bus=self.bus, **d),
            VoiceDeleted: partial(a.on_voice_deleted, **d),
            c.ObjectsReleased: partial(a.on_objects_released, **d),
            AccountPurgeRequested: partial(a.on_account_purge, bus=self.bus, **d),
        }, deduper=deduper)
        self._tasks.append(asyncio.create_task(self._sweep_forever()))
        if isinstance(self.store, FsBlobStore):
            await self._serve_http(self.store)

    async def _serve_http(self, store: FsBlobStore) -> None:
        """Signed URLs of the fs backend are served here."""
        from urllib.parse import urlparse

        url = urlparse(self.settings.storage_public_url)
        self._server = HttpServer(build_http_app(store), host=self.settings.storage_http_host, port=url.port or 8001)
        await self._server.start()

    async def _sweep_forever(self) -> None:
        while True:
            try:
                swept = await a.sweep(repo=self.repo, store=self.store, bus=self.bus, batch=self.settings.sweep_batch)
                if swept:
                    log.info("expired_objects_swept", objects=swept)
            except Exception:
                log.exception("expiry_sweep_failed")
            await asyncio.sleep(self.settings.sweep_interval_s)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.stop()
        await self.broker.close()
        await self.store.close()
        await self.pool.close()


async def build(settings: StorageSettings | None = None) -> StorageService:
    settings = settings or StorageSettings()
    pool = TransactionalPool(await create_pool(settings.database_url.get_secret_value(), schema=SCHEMA))
    await migrate(pool, SCHEMA, MIGRATIONS_DIR)
    store = await build_blob_store(settings)
    bus = await Bus(url=settings.amqp_url.get_secret_value(), namespace=settings.bus_namespace,
                    service="storage", rpc_timeout=settings.rpc_timeout_s).connect()
    return StorageService(settings, bus, pool, store)
