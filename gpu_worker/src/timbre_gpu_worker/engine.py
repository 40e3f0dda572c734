"""The synthesis engine shared by both transports: backends by name, and batching of concurrent jobs."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from timbre_common.logging import get_logger

from .backends.base import Backend, BackendError, SynthesisRequest, SynthesisResult

log = get_logger(__name__)


@dataclass
class _Pending:
    request: SynthesisRequest
    future: asyncio.Future[SynthesisResult]


class Engine:
    """Runs jobs on their backend; jobs for one backend that arrive together run as one batch."""

    def __init__(self, backends: dict[str, Backend], *, max_batch: int = 8, batch_window_ms: int = 25,
                 batch_timeout_s: float = 900.0) -> None:
        self.backends = backends
        self.max_batch = max_batch
        # A backend call that never returns must not hold its jobs forever (the thread itself cannot be killed).
        self.batch_timeout_s = batch_timeout_s
        self.batch_window = batch_window_ms / 1000
        self._queues: dict[str, asyncio.Queue[_Pending]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self.batches_run = 0

    @property
    def names(self) -> list[str]:
        return sorted(self.backends)

    def load_all(self) -> None:
        for name, backend in self.backends.items():
            started = time.perf_counter()
            backend.load()
            log.info("backend_loaded", backend=name, load_s=round(time.perf_counter() - started, 2))

    def require(self, backend: str) -> None:
        """Refuse a backend this worker does not run: a final failure, not one to retry here."""
        if backend not in self.backends:
            raise BackendError("backend_unavailable", f"backend {backend} is not available on this worker")

    async def synthesize(self, backend: str, request: SynthesisRequest) -> SynthesisResult:
        """Queue one request for its backend's next batch and wait for its result."""
        self.require(backend)
        queue = self._queues.get(backend)
        if queue is None:
            queue = self._queues[backend] = asyncio.Queue()
            self._loops.append(asyncio.create_task(self._batch_loop(backend, queue)))
        future: asyncio.Future[SynthesisResult] = asyncio.get_running_loop().create_future()
        await queue.put(_Pending(request, future))
        return await future

    async def profile(self, backend: str, voice_id: str, reference_wav: bytes, ref_text: str | None) -> dict:
        self.require(backend)
        return await asyncio.to_thread(self.backends[backend].profile_voice, voice_id, reference_wav, ref_text)

    async def _batch_loop(self, name: str, queue: asyncio.Queue[_Pending]) -> None:
        backend = self.backends[name]
        while True:
            batch = [await queue.get()]
            # A streamed job's listener is waiting for its first audio: it takes what is queued already but
            # waits for no one else.
            window = 0.0 if batch[0].request.on_chunk is not None else self.batch_window
            deadline = asyncio.get_running_loop().time() + window
            while len(batch) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    if queue.empty():
                        break
                    batch.append(queue.get_nowait())
                    continue
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except TimeoutError:
                    break
            try:
                await self._run_batch(name, backend, batch)
            except Exception as exc:
                # The loop outlives any batch: a dead loop would leave every later job of this backend waiting
                # on a future nobody resolves. Each job of this batch sees the error and is retried.
                log.exception("batch_failed", backend=name, batch_size=len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    async def _run_batch(self, name: str, backend: Backend, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            results = await asyncio.wait_for(
                asyncio.to_thread(backend.synthesize_batch, [p.request for p in batch]), self.batch_timeout_s)
        except TimeoutError as exc:
            raise TimeoutError(f"{name} batch of {len(batch)} took longer than {self.batch_timeout_s:.0f}s") from exc
        if len(results) != len(batch):
            raise RuntimeError(f"{name} returned {len(results)} results for a batch of {len(batch)}")
        self.batches_run += 1
        log.info("batch_synthesized", backend=name, batch_size=len(batch),
                 wall_ms=round((time.perf_counter() - started) * 1000, 1))
        for p, result in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)

    async def close(self) -> None:
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def build_backends(settings_backends: list[str], factories: dict[str, Callable[[], Backend]]) -> dict[str, Backend]:
    """Instantiate the wanted backends and keep those that can run here."""
    out: dict[str, Backend] = {}
    for name in settings_backends:
        factory = factories.get(name)
        if factory is None:
            log.warning("backend_unknown", backend=name)
            continue
        try:
            backend = factory()
            if backend.available():
                out[name] = backend
            else:
                log.info("backend_not_available", backend=name)
        except Exception as exc:
            log.warning("backend_not_available", backend=name, error=f"{type(exc).__name__}: {exc}")
    return out
