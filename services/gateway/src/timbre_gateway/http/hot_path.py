"""Answers that need no RPC: a cache hit, a ready job's poll and its audio, from the read models and the bucket.

Each function returns None whenever it cannot answer for certain (the read models do not know the voice, the
cache key or the job; a rendition not made yet; an object missing): the caller then takes the path through the
services, so correctness never depends on the read models being warm. Keys, rate and concurrency limits are
checked before these run (the key dependency, locally). A cache hit is unbilled and needs no quota answer.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import Response

from timbre_common import metrics
from timbre_common.contracts.synthesis import cache_key
from timbre_common.logging import get_logger

from ..adapters.bucket import rendition_key
from ..adapters.read_models import ReadyJob
from .errors import ApiError

log = get_logger(__name__)


async def _read_audio(ctx: Any, job: ReadyJob, fmt: str) -> tuple[bytes, str] | None:
    key = rendition_key(job.audio_key, fmt)
    if key is None:
        return None
    try:
        return await ctx.bucket.read(key)
    except Exception as exc:  # noqa: BLE001 - the bucket through storage is still there
        log.warning("bucket_read_failed", key=key, error=type(exc).__name__)
        return None


def _usable(ctx: Any) -> bool:
    return getattr(ctx, "read_models", None) is not None and getattr(ctx, "bucket", None) is not None


async def cache_hit(ctx: Any, caller: Any, body: Any) -> Response | None:
    """The audio of a cache hit, headers as the dispatcher's hit would have them; None: ask the services."""
    if not _usable(ctx) or body.webhook_url or body.timestamps or body.stream:
        return None
    text = body.text
    if not text.strip() or len(text) > ctx.settings.max_text_chars:
        return None
    voice = ctx.read_models.voice(caller.account_id, body.voice_id)
    if voice is None:
        return None
    backend = body.backend or voice.backend
    lang = body.lang or voice.lang
    from .routes import _check_backend_lang  # routes imports this module

    try:
        _check_backend_lang(backend, lang, ctx)
    except ApiError:
        return None  # the services' path gives the same refusal, in its order
    job = ctx.read_models.cached(caller.account_id, cache_key(voice.voice_id, text, lang, backend))
    if job is None:
        return None
    read = await _read_audio(ctx, job, body.response_format)
    if read is None:
        return None
    audio, content_type = read
    headers = {"X-Voice-Id": voice.voice_id, "X-Backend": backend, "X-Cache": "HIT",
               "X-Synthesis-Time-Ms": str(job.synthesis_ms or 0), "X-Job-Id": job.job_id}
    if job.expires_at:
        headers["X-Expires-At"] = job.expires_at.isoformat()
    # Counted with the dispatcher's lookups, so the cache hit ratio covers the hits answered here too.
    metrics.CACHE_LOOKUPS.labels(backend, "hit").inc()
    return Response(audio, media_type=content_type, headers=headers)


def ready_job(ctx: Any, caller: Any, job_id: str) -> ReadyJob | None:
    if not _usable(ctx):
        return None
    return ctx.read_models.ready_job(caller.account_id, job_id)


async def job_view(ctx: Any, caller: Any, job_id: str) -> dict[str, Any] | None:
    """A ready job's record with a fresh download URL (signed here, valid an hour at most and never past the
    audio's expiry); None: ask the dispatcher."""
    job = ready_job(ctx, caller, job_id)
    if job is None:
        return None
    expires_in = 3600
    if job.expires_at is not None:
        expires_in = min(expires_in, max(1, int((job.expires_at - datetime.now(UTC)).total_seconds())))
    try:
        url = await ctx.bucket.presign(job.audio_key, expires_in)
    except Exception as exc:  # noqa: BLE001 - storage signs it otherwise
        log.warning("bucket_presign_failed", key=job.audio_key, error=type(exc).__name__)
        return None
    if url is None:
        return None
    return {"job_id": job.job_id, "status": "ready", "voice_id": job.voice_id, "backend": job.backend,
            "lang": job.lang, "characters": job.characters, "response_format": job.response_format,
            "created_at": job.created_at, "completed_at": job.completed_at, "audio_url": url,
            "expires_at": job.expires_at, "synthesis_ms": job.synthesis_ms, "audio_seconds": job.audio_seconds,
            "synthesized_at": job.synthesized_at, "stored_at": job.stored_at}


async def job_audio(ctx: Any, caller: Any, job_id: str) -> Response | None:
    """A ready job's audio in its own format; None: ask the dispatcher."""
    job = ready_job(ctx, caller, job_id)
    if job is None:
        return None
    read = await _read_audio(ctx, job, job.response_format)
    if read is None:
        return None
    audio, content_type = read
    headers = {"X-Job-Id": job.job_id, "X-Voice-Id": job.voice_id, "X-Backend": job.backend}
    if job.expires_at:
        headers["X-Expires-At"] = job.expires_at.isoformat()
    return Response(audio, media_type=content_type, headers=headers)
