"""Wiring of the GPU worker: backends, engine, bus consumers, heartbeat."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from functools import partial

import httpx

from timbre_common.contracts.synthesis import SynthesisRequested, WorkerHeartbeat
from timbre_common.contracts.voices import VoiceRegistered
from timbre_common.logging import get_logger
from timbre_common.messaging import Bus, local_work_queue, voice_profile_queue
from timbre_common.metrics import start_at_zero_for

from . import handlers
from .alignment import WordAligner
from .backends.base import Backend
from .engine import Engine, build_backends
from .settings import WorkerSettings

log = get_logger(__name__)


def backend_factories(settings: WorkerSettings) -> dict[str, Callable[[], Backend]]:
    """How to build each backend; heavy imports happen only for the ones asked for."""

    def embedded() -> Backend:
        from .backends.embedded import EmbeddedBackend

        return EmbeddedBackend()

    def qwen3(name: str, model_dir: os.PathLike | None) -> Backend:
        from .backends.qwen3 import Qwen3Backend

        return Qwen3Backend(name, model_dir, device=settings.device)

    return {
        "embedded": embedded,
        "qwen3-1.7b": partial(qwen3, "qwen3-1.7b", settings.qwen3_1_7b_model_dir),
        "qwen3-0.6b": partial(qwen3, "qwen3-0.6b", settings.qwen3_0_6b_model_dir),
    }


class WorkerService:
    def __init__(self, settings: WorkerSettings, bus: Bus, engine: Engine) -> None:
        self.settings, self.bus, self.engine = settings, bus, engine
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0), follow_redirects=False)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.settings.load_on_start:
            await asyncio.to_thread(self.engine.load_all)
        start_at_zero_for(self.engine.names, worker=True)
        deps = {"engine": self.engine, "bus": self.bus, "http": self.http,
                "max_reference_bytes": self.settings.max_reference_bytes}
        # Word timestamps by forced alignment (loaded on the first job that asks for them).
        aligner = WordAligner() if WordAligner.available() else None
        for backend in self.engine.names:
            await self.bus.consume(local_work_queue(backend, self.settings.work_queue_max_length), {
                SynthesisRequested: partial(handlers.on_synthesis_requested, aligner=aligner, **deps)})
        for backend in self.engine.names:
            await self.bus.consume(voice_profile_queue(backend), {VoiceRegistered: partial(
                handlers.on_voice_registered, only_backend=backend, **deps)})
        self._heartbeat = asyncio.create_task(self._beat())
        log.info("worker_ready", backends=self.engine.names, worker_id=self.worker_id)

    async def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.bus.publish(WorkerHeartbeat(worker_id=self.worker_id, backends=self.engine.names,
                                                       interval_s=self.settings.heartbeat_interval_s))
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def stop(self) -> None:
        if self._heartbeat:
            self._heartbeat.cancel()
        await self.bus.close()
        await self.engine.close()
        await self.http.aclose()


async def build(settings: WorkerSettings | None = None, *,
                backends: dict[str, Backend] | None = None) -> WorkerService:
    settings = settings or WorkerSettings()
    if backends is None:
        wanted = [b.strip() for b in settings.backends.split(",") if b.strip()]
        backends = build_backends(wanted, backend_factories(settings))
    engine = Engine(backends, max_batch=settings.max_batch, batch_window_ms=settings.batch_window_ms,
                    batch_timeout_s=settings.batch_timeout_s, short_lane_chars=settings.short_lane_chars)
    bus = await Bus(url=settings.amqp_url.get_secret_value(), namespace=settings.bus_namespace,
                    service="gpu_worker", rpc_timeout=settings.rpc_timeout_s).connect(
                        declare=[*(local_work_queue(b, settings.work_queue_max_length) for b in engine.names),
                                 *(voice_profile_queue(b) for b in engine.names)])
    return WorkerService(settings, bus, engine)
