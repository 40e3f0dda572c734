"""GPU worker handlers (the RabbitMQ transport of the engine).

Consumes: synthesis.requested (the local executor's work queue), voice.registered (per-voice profiles, one
queue per backend).
Emits: synthesis.completed (WAV as the body), synthesis.failed, voice.profiled, worker.heartbeat.
Calls: dispatcher (LookupJob: is this work order still the job's current attempt?).
"""
from __future__ import annotations

import time

import httpx

from timbre_common import metrics, tracing
from timbre_common.audio import encode_wav
from timbre_common.contracts import Envelope
from timbre_common.contracts.synthesis import (
    JobOwner,
    LookupJob,
    SynthesisCompleted,
    SynthesisFailed,
    SynthesisRequested,
)
from timbre_common.contracts.voices import VoiceProfiled, VoiceRegistered
from timbre_common.logging import get_logger
from timbre_common.messaging import RemoteError, RpcTimeout
from timbre_common.ports import MessageBus

from .backends.base import BackendError, SynthesisRequest
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


async def on_synthesis_requested(order: SynthesisRequested, *, envelope: Envelope, engine: Engine, bus: MessageBus,
                                 http: httpx.AsyncClient, max_reference_bytes: int) -> None:
    """Synthesize one job and report it; a final failure is reported, a transient one raised for retry.

    A superseded work order is acknowledged without synthesis."""
    if (why := await superseded(order, bus=bus)) is not None:
        log.info("work_order_superseded", job_id=order.job_id, attempt=order.attempt, reason=why)
        return
    started = time.perf_counter()
    log.info("synthesis_started", job_id=order.job_id, backend=order.backend, attempt=order.attempt)
    try:
        engine.require(order.backend)  # before downloading a reference that no backend here could use
        reference = None
        if order.reference_url:
            reference = await fetch_reference(http, order.reference_url, max_bytes=max_reference_bytes)
        request = SynthesisRequest(job_id=order.job_id, text=order.text, lang=order.lang, voice_id=order.voice_id,
                                   reference_wav=reference, ref_text=order.ref_text,
                                   system_voice=order.system_voice, voice_profile=order.voice_profile)
        with tracing.span("synthesize", backend=order.backend, job_id=order.job_id, characters=len(order.text)):
            result = await engine.synthesize(order.backend, request)
    except BackendError as exc:
        metrics.SYNTHESES.labels(order.backend, "failed").inc()
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
                           details=result.details),
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
