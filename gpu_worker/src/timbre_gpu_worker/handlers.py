"""GPU worker handlers (the RabbitMQ transport of the engine).

Consumes: synthesis.requested (the local executor's work queue), voice.registered (per-voice profiles, one
queue per backend).
Emits: synthesis.completed (WAV as the body), synthesis.failed, voice.profiled, worker.heartbeat.
Calls: dispatcher (LookupJob: is this work order still the job's current attempt?).
Sends: synthesis.chunk (PCM pieces of a streamed job, straight to the gateway instance named in the order).
"""
from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np

from timbre_common import metrics, tracing
from timbre_common.audio import encode_wav
from timbre_common.contracts import Envelope
from timbre_common.contracts.synthesis import (
    JobOwner,
    LookupJob,
    SynthesisChunk,
    SynthesisCompleted,
    SynthesisFailed,
    SynthesisRequested,
)
from timbre_common.contracts.voices import VoiceProfiled, VoiceRegistered
from timbre_common.logging import get_logger
from timbre_common.messaging import RemoteError, RpcTimeout
from timbre_common.ports import MessageBus

from . import alignment
from .alignment import WordAligner
from .backends.base import BackendError, SynthesisRequest, SynthesisResult, pcm16
from .engine import Engine

log = get_logger(__name__)


class ReferenceMissing(BackendError):
    def __init__(self, reason: str) -> None:
        super().__init__("reference_missing", reason)


async def fetch_reference(http: httpx.AsyncClient, url: str, *, max_bytes: int) -> bytes:
    """Download reference audio through its presigned URL; a 4xx is final, anything else is retried."""
    async with http.stream("GET", url) as response:
        if response.status_code in (403, 404, 410):
            raise ReferenceMissing(f"reference audio not available (HTTP {response.status_code})")
        response.raise_for_status()
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise BackendError("reference_too_large", "reference audio exceeds the worker's limit")
            chunks.append(chunk)
    return b"".join(chunks)


# How long the worker waits to learn whether a work order is still wanted; past it, the order is run.
SUPERSEDED_CHECK_TIMEOUT_S = 5.0


async def superseded(order: SynthesisRequested, *, bus: MessageBus) -> str | None:
    """Why the work order need not run (the job is gone or ended, or a newer attempt was handed out), or None.

    One short RPC per order: cheap beside a synthesis, and it keeps a backlog of re-sent orders from being
    synthesized once per attempt. Without an answer the order runs (the dispatcher keeps the first result).
    """
    try:
        owner, _ = await bus.call("dispatcher", LookupJob(job_id=order.job_id), expect=JobOwner,
                                  timeout=SUPERSEDED_CHECK_TIMEOUT_S)
    except RemoteError as exc:
        return "job deleted" if exc.code == "job_not_found" else None
    except RpcTimeout:
        return None
    if owner.status != "pending":
        return f"job {owner.status}"
    if owner.attempts > order.attempt:
        return f"attempt {owner.attempts} handed out"
    return None


class StreamSender:
    """Sends the pieces of one streamed job, in order, to the gateway instance that holds its connection.

    The backend hands pieces over from its own thread; they queue here and one task sends them, so a slow
    broker never stalls synthesis and the order is kept. A piece that cannot be sent is logged and skipped:
    the gateway sees the gap and ends the stream with an error, while the job itself still completes.
    """

    def __init__(self, bus: MessageBus, order: SynthesisRequested, *, hold_final: bool = False) -> None:
        self.bus, self.order = bus, order
        self.next_seq = 0
        # With word timestamps, the last piece waits for them (the listener is still playing earlier pieces).
        self.hold_final = hold_final
        self._held: tuple[bytes, int, int, int] | None = None
        self._queue: asyncio.Queue[tuple[np.ndarray, int, int, int] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def sink(self):  # type: ignore[no-untyped-def]
        """The backend's on_chunk: thread-safe, never blocks the backend."""
        loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._pump())

        def on_chunk(samples: np.ndarray, sample_rate: int, index: int, total: int) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, (samples, sample_rate, index, total))

        return on_chunk

    async def _pump(self) -> None:
        while (item := await self._queue.get()) is not None:
            samples, rate, index, total = item
            if self.hold_final and index + 1 >= total:
                self._held = (pcm16(samples), rate, index, total)
                continue
            await self.send(pcm16(samples), rate, seq=index, final=index + 1 >= total, total=total)

    async def send(self, body: bytes, sample_rate: int, *, seq: int, final: bool, total: int | None,
                   error_code: str | None = None, error: str | None = None,
                   words: list[dict] | None = None) -> None:
        order = self.order
        assert order.stream_to and order.stream_id
        chunk = SynthesisChunk(job_id=order.job_id, stream_id=order.stream_id, attempt=order.attempt, seq=seq,
                               final=final, sample_rate=sample_rate, total=total, error_code=error_code,
                               error=error, words=words)
        try:
            await self.bus.send(order.stream_to, chunk, body=body, account_id=order.account_id)
        except Exception as exc:  # noqa: BLE001 - the job must finish even if its listener cannot be reached
            log.warning("stream_piece_unsent", job_id=order.job_id, seq=seq, error=type(exc).__name__)
            return
        self.next_seq = seq + 1
        log.info("stream_piece_sent", job_id=order.job_id, seq=seq, final=final, total=total, bytes=len(body))

    async def close(self) -> None:
        """Wait until every piece handed over has been sent."""
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None

    async def finish(self, result: SynthesisResult, words: list[dict] | None = None) -> None:
        """After a good synthesis: the held last piece goes (with the words), or, from a backend that could not
        stream, the whole audio as the one piece."""
        await self.close()
        if self._held is not None:
            body, rate, seq, total = self._held
            await self.send(body, rate, seq=seq, final=True, total=total, words=words)
        elif not result.streamed:
            await self.send(pcm16(result.samples), result.sample_rate, seq=0, final=True, total=1, words=words)

    async def fail(self, code: str, reason: str) -> None:
        """After a final failure: tell the listener, so its client gets the reason rather than a timeout."""
        await self.close()
        await self.send(b"", 0, seq=self.next_seq, final=True, total=None, error_code=code, error=reason)


async def word_timestamps(order: SynthesisRequested, result: SynthesisResult,
                          aligner: WordAligner | None) -> list[dict] | None:
    """The words of the job with their times: the backend's own when it has them (Piper's phoneme durations),
    else forced alignment;
    `[]` for a language that gets none (never wrong ones); None when they could not be made."""
    try:
        return await asyncio.to_thread(alignment.job_words, order.lang, order.text, result.samples,
                                       result.sample_rate, result.words, aligner)
    except Exception as exc:  # noqa: BLE001 - the audio is good; the job goes on without timestamps
        log.warning("word_alignment_failed", job_id=order.job_id, error=f"{type(exc).__name__}: {exc}")
        return None


async def on_synthesis_requested(order: SynthesisRequested, *, envelope: Envelope, engine: Engine, bus: MessageBus,
                                 http: httpx.AsyncClient, max_reference_bytes: int,
                                 aligner: WordAligner | None = None) -> None:
    """Synthesize one job and report it; a final failure is reported, a transient one raised for retry.

    A superseded work order is acknowledged without synthesis."""
    if (why := await superseded(order, bus=bus)) is not None:
        log.info("work_order_superseded", job_id=order.job_id, attempt=order.attempt, reason=why)
        return
    started = time.perf_counter()
    log.info("synthesis_started", job_id=order.job_id, backend=order.backend, attempt=order.attempt)
    stream = (StreamSender(bus, order, hold_final=order.timestamps) if order.stream_to and order.stream_id
              else None)
    try:
        engine.require(order.backend)  # before downloading a reference that no backend here could use
        reference = None
        if order.reference_url:
            reference = await fetch_reference(http, order.reference_url, max_bytes=max_reference_bytes)
        request = SynthesisRequest(job_id=order.job_id, text=order.text, lang=order.lang, voice_id=order.voice_id,
                                   reference_wav=reference, ref_text=order.ref_text,
                                   system_voice=order.system_voice, voice_profile=order.voice_profile,
                                   on_chunk=stream.sink() if stream else None)
        try:
            with tracing.span("synthesize", backend=order.backend, job_id=order.job_id, characters=len(order.text)):
                result = await engine.synthesize(order.backend, request)
        finally:
            if stream:
                await stream.close()
        words = await word_timestamps(order, result, aligner) if order.timestamps else None
        if stream:
            await stream.finish(result, words)
    except BackendError as exc:
        metrics.SYNTHESES.labels(order.backend, "failed").inc()
        if stream:
            await stream.fail(exc.code, exc.reason)
        await bus.publish(SynthesisFailed(job_id=order.job_id, account_id=order.account_id, code=exc.code,
                                          reason=exc.reason, retryable=False, attempt=order.attempt),
                          message_id=f"{order.job_id}:{order.attempt}:failed")
        log.warning("synthesis_failed", job_id=order.job_id, backend=order.backend, code=exc.code, reason=exc.reason)
        return
    synthesis_ms = int((time.perf_counter() - started) * 1000)
    seconds = result.audio_seconds
    rtf = (synthesis_ms / 1000) / seconds if seconds > 0 else 0.0
    wall = time.perf_counter() - started
    metrics.SYNTHESES.labels(order.backend, "completed").inc()
    metrics.SYNTHESIS_AUDIO_SECONDS.labels(order.backend).inc(seconds)
    metrics.SYNTHESIS_WALL_SECONDS.labels(order.backend).inc(wall)
    if wall > 0:
        metrics.SYNTHESIS_SPEED.labels(order.backend).observe(seconds / wall)
    wav = encode_wav(result.samples, result.sample_rate)
    await bus.publish(
        SynthesisCompleted(job_id=order.job_id, account_id=order.account_id, voice_id=order.voice_id,
                           backend=order.backend, sample_rate=result.sample_rate, audio_seconds=round(seconds, 3),
                           synthesis_ms=synthesis_ms, rtf=round(rtf, 4), job_created_at=order.job_created_at,
                           details={**result.details, "words": words} if words is not None else result.details),
        body=wav, message_id=f"{order.job_id}:{order.attempt}:completed")
    log.info("synthesis_completed", job_id=order.job_id, backend=order.backend, attempt=order.attempt,
             synthesis_ms=synthesis_ms, audio_seconds=round(seconds, 3), rtf=round(rtf, 4),
             characters=len(order.text), details=result.details)


async def on_voice_registered(event: VoiceRegistered, *, envelope: Envelope, engine: Engine, bus: MessageBus,
                              http: httpx.AsyncClient, max_reference_bytes: int,
                              only_backend: str | None = None) -> None:
    """Precompute what the voice's backend keeps per voice, so jobs need not.

    Each backend's profile queue carries every registration; `only_backend` keeps the ones for it.
    """
    if event.backend not in engine.backends or (only_backend is not None and event.backend != only_backend):
        return
    try:
        reference = await fetch_reference(http, event.reference_url, max_bytes=max_reference_bytes)
        profile = await engine.profile(event.backend, event.voice_id, reference, event.ref_text)
    except BackendError as exc:
        log.warning("voice_profile_failed", voice_id=event.voice_id, code=exc.code, reason=exc.reason)
        return
    await bus.publish(VoiceProfiled(voice_id=event.voice_id, account_id=event.account_id, backend=event.backend,
                                    profile=profile))
    log.info("voice_profiled", voice_id=event.voice_id, backend=event.backend)
