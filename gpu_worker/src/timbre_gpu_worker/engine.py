"""The synthesis engine shared by both transports: backends by name, and batching of concurrent jobs.

Jobs for one backend that arrive together run as one batch. A backend that can run batches side by side
(`concurrent_lanes`, the Qwen3 backends) gets two lanes, short and long texts, each with its own batch
loop, so a short job never waits behind a long batch. Each job is delivered as soon as the backend has it
(`on_result`), not when its whole batch ends; a batch that overruns its time fails only the jobs it has
not delivered, and those are retried.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

from timbre_common.catalogue import expected_synthesis_seconds
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
                 batch_timeout_s: float = 900.0, short_lane_chars: int = 200) -> None:
        self.backends = backends
        self.max_batch = max_batch
        # A backend call that never returns must not hold its jobs forever (the thread itself cannot be killed).
        # Each batch gets the time its text length calls for (batch_timeout_for), at most this much.
        self.batch_timeout_s = batch_timeout_s
        self.batch_window = batch_window_ms / 1000
        self.short_lane_chars = short_lane_chars
        self._queues: dict[tuple[str, str], asyncio.Queue[_Pending]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._closing = False
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

    def lane(self, backend: str, request: SynthesisRequest) -> str:
        """Which batch loop of the backend a request joins: "short" or "long" text, or "all"."""
        if not getattr(self.backends[backend], "concurrent_lanes", False):
            return "all"
        return "short" if len(request.text) <= self.short_lane_chars else "long"

    def batch_timeout_for(self, backend: str, requests: list[SynthesisRequest]) -> float:
        """The batch's time: the shared length-based figure for all its characters, capped by batch_timeout_s."""
        chars = sum(len(r.text) for r in requests)
        return min(self.batch_timeout_s, expected_synthesis_seconds(backend, chars))

    async def synthesize(self, backend: str, request: SynthesisRequest) -> SynthesisResult:
        """Queue one request for its backend's next batch and wait for its result."""
        self.require(backend)
        key = (backend, self.lane(backend, request))
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue()
            self._loops.append(asyncio.create_task(self._batch_loop(backend, queue)))
        future: asyncio.Future[SynthesisResult] = asyncio.get_running_loop().create_future()
        await queue.put(_Pending(request, future))
        return await future

    async def profile(self, backend: str, voice_id: str, reference_wav: bytes, ref_text: str | None) -> dict:
        self.require(backend)
        return await asyncio.to_thread(self.backends[backend].profile_voice, voice_id, reference_wav, ref_text)

    async def _batch_loop(self, name: str, queue: asyncio.Queue[_Pending]) -> None:
        backend = self.backends[name]
        # Python 3.11's wait_for returns the result and drops a cancellation that arrives as its inner call
        # completes, so close() also raises this flag: a loop that missed its cancel stops at the next batch.
        while not self._closing:
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
        requests = [p.request for p in batch]
        timeout = self.batch_timeout_for(name, requests)
        loop = asyncio.get_running_loop()

        def resolve(index: int, result: SynthesisResult | BaseException) -> None:
            p = batch[index]
            if p.future.done():
                return
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)

        call: Callable[[], list[SynthesisResult | BackendError]]
        if _accepts_on_result(backend):
            # Called from the backend's thread as each job is done: hand it to the loop at once.
            def on_result(index: int, result: SynthesisResult | BackendError) -> None:
                if 0 <= index < len(batch):
                    loop.call_soon_threadsafe(resolve, index, result)

            def call() -> list[SynthesisResult | BackendError]:
                return backend.synthesize_batch(requests, on_result=on_result)  # type: ignore[call-arg]
        else:
            def call() -> list[SynthesisResult | BackendError]:
                return backend.synthesize_batch(requests)
        try:
            results = await asyncio.wait_for(asyncio.to_thread(call), timeout)
        except TimeoutError as exc:
            delivered = sum(p.future.done() for p in batch)
            raise TimeoutError(f"{name} batch of {len(batch)} took longer than {timeout:.0f}s "
                               f"({delivered} of its jobs delivered)") from exc
        if len(results) != len(batch):
            raise RuntimeError(f"{name} returned {len(results)} results for a batch of {len(batch)}")
        self.batches_run += 1
        log.info("batch_synthesized", backend=name, batch_size=len(batch),
                 wall_ms=round((time.perf_counter() - started) * 1000, 1))
        for i, result in enumerate(results):
            resolve(i, result)

    async def close(self) -> None:
        self._closing = True
        for task in self._loops:
            # Cancel until it takes: one cancel can be swallowed by a wait_for whose call ends at that moment.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _accepts_on_result(backend: Backend) -> bool:
    try:
        return "on_result" in inspect.signature(backend.synthesize_batch).parameters
    except (TypeError, ValueError):
        return False


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
