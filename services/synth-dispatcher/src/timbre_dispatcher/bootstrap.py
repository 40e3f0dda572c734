"""Wiring of the dispatcher: pool, migrations, bus, handler table, deadline sweeper, executor."""
from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from pathlib import Path
from typing import Any

from timbre_common.catalogue import KNOWN_BACKENDS
from timbre_common.contracts.accounts import AccountPurgeRequested
from timbre_common.contracts.storage import AudioStored, ObjectsExpired
from timbre_common.contracts.synthesis import (
    FetchJobAudio,
    GetJob,
    LookupJob,
    PurgeVoiceJobs,
    SubmitSynthesis,
    SynthesisFailed,
    SynthesisRequested,
    WorkerHeartbeat,
)
from timbre_common.contracts.voices import VoiceDeleted
from timbre_common.db import create_pool, migrate
from timbre_common.logging import get_logger
from timbre_common.messaging import (
    QUEUES,
    Bus,
    OutboxBus,
    PgDeduper,
    QueueSpec,
    TransactionalPool,
    local_work_queue,
    modal_executor_queue,
)
from timbre_common.metrics import start_at_zero_for

from . import handlers
from .adapters.modal_executor import HttpSpawner, ModalSpawner, Spawner, spawn_work_order
from .adapters.repository import CacheIndex, JobRepository
from .settings import DispatcherSettings

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
log = get_logger(__name__)


def work_queues(settings: DispatcherSettings) -> list[QueueSpec]:
    """Every backend's work orders have a queue before the first is published: Modal's or the local one."""
    modal = settings.modal_backend_names if settings.executor == "modal" else []
    queues = [local_work_queue(b, settings.work_queue_max_length) for b in KNOWN_BACKENDS if b not in modal]
    if modal:
        queues.append(modal_executor_queue(modal, settings.work_queue_max_length))
    return queues


def spawner_for(settings: DispatcherSettings) -> Spawner:
    """Modal itself, unless MODAL_SPAWN_URL names another host that takes the same payloads."""
    if settings.modal_spawn_url:
        return HttpSpawner(settings.modal_spawn_url)
    return ModalSpawner(settings.modal_app_name, settings.modal_class_name)


class DispatcherService:
    def __init__(self, settings: DispatcherSettings, bus: Bus, pool: Any, spawner: Spawner | None = None) -> None:
        self.settings, self.pool = settings, pool
        self.broker = bus
        # Handlers publish through the outbox: events commit with the state they announce.
        self.bus = OutboxBus(bus, pool)
        self.jobs = JobRepository(pool)
        self.cache = CacheIndex(pool)
        self.policy = handlers.JobPolicy(deadline_s=settings.job_deadline_s, max_attempts=settings.job_max_attempts,
                                         reference_url_ttl_s=settings.reference_url_ttl_s,
                                         deadline_per_char_s=dict(settings.job_deadline_per_char_s),
                                         max_pending_per_account=settings.max_pending_jobs_per_account)
        self.spawner = spawner
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        start_at_zero_for(KNOWN_BACKENDS)
        d = {"jobs": self.jobs, "bus": self.bus}
        await self.bus.ensure()
        self.bus.start()
        await self.broker.serve({
            SubmitSynthesis: partial(handlers.submit, cache=self.cache, policy=self.policy, **d),
            GetJob: partial(handlers.get_job, cache=self.cache, **d),
            FetchJobAudio: partial(handlers.fetch_audio, cache=self.cache, **d),
            LookupJob: partial(handlers.lookup_job, jobs=self.jobs),
            PurgeVoiceJobs: partial(handlers.purge_voice, cache=self.cache, **d),
        })
        deduper = PgDeduper(self.pool)
        await deduper.ensure()
        await self.broker.consume(QUEUES["dispatcher.events"], {
            AudioStored: partial(handlers.on_audio_stored, cache=self.cache, **d),
            SynthesisFailed: partial(handlers.on_synthesis_failed, policy=self.policy, **d),
            ObjectsExpired: partial(handlers.on_objects_expired, cache=self.cache, **d),
            VoiceDeleted: partial(handlers.on_voice_deleted, cache=self.cache, **d),
            AccountPurgeRequested: partial(handlers.on_account_purge, cache=self.cache, **d),
        }, deduper=deduper)
        if self.settings.executor == "modal":
            spawner = self.spawner or spawner_for(self.settings)
            await self.broker.consume(modal_executor_queue(self.settings.modal_backend_names,
                                                           self.settings.work_queue_max_length),
                                   {SynthesisRequested: partial(
                spawn_work_order, spawner=spawner, jobs=self.jobs, public_base_url=self.settings.public_base_url,
                callback_secret=self.settings.modal_callback_secret.get_secret_value())})
            self._tasks.append(asyncio.create_task(self._advertise_modal()))
        self._tasks.append(asyncio.create_task(self._sweep_forever()))

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_retention = loop.time()
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                swept = await handlers.sweep_overdue(jobs=self.jobs, bus=self.bus, policy=self.policy)
                if swept:
                    log.info("overdue_jobs_swept", jobs=swept)
            except Exception:
                log.exception("deadline_sweep_failed")
            if loop.time() >= next_retention:
                # Retention works in days: a pass a minute is plenty.
                next_retention = loop.time() + 60.0
                try:
                    deleted = await handlers.sweep_finished(jobs=self.jobs, cache=self.cache, bus=self.bus,
                                                            retention_s=self.settings.job_retention_s)
                    if deleted:
                        log.info("finished_jobs_deleted", jobs=deleted)
                except Exception:
                    log.exception("job_retention_sweep_failed")

    async def _advertise_modal(self) -> None:
        backends = self.settings.modal_backend_names
        while True:
            with contextlib.suppress(Exception):
                await self.broker.publish(WorkerHeartbeat(worker_id="modal", backends=backends, executor="modal",
                                                       interval_s=self.settings.modal_heartbeat_interval_s))
            await asyncio.sleep(self.settings.modal_heartbeat_interval_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.stop()
        await self.broker.close()
        await self.pool.close()


async def build(settings: DispatcherSettings | None = None, *, spawner: Spawner | None = None) -> DispatcherService:
    settings = settings or DispatcherSettings()
    pool = TransactionalPool(await create_pool(settings.database_url.get_secret_value(), schema=settings.db_schema))
    await migrate(pool, settings.db_schema, MIGRATIONS)
    bus = await Bus(url=settings.amqp_url.get_secret_value(), namespace=settings.bus_namespace,
                    service="dispatcher", rpc_timeout=settings.rpc_timeout_s).connect(declare=work_queues(settings))
    return DispatcherService(settings, bus, pool, spawner)
