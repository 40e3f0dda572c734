"""The public API of seeds/002 (billing routes live in routes_billing)."""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from timbre_common.audio import AudioError, decode_wav, sniff_content_type, transcode
from timbre_common.catalogue import BACKEND_LANGUAGES, KNOWN_BACKENDS
from timbre_common.contracts.accounts import PURGING_SERVICES, AccountPurgeRequested, ApiKeysChanged
from timbre_common.contracts.billing import CheckQuota, GetUsage, QuotaDecision, ReleaseHold, UsageReport
from timbre_common.contracts.storage import PutUpload, UploadRecord
from timbre_common.contracts.synthesis import (
    FetchJobAudio,
    GetJob,
    JobView,
    LookupJob,
    PurgeVoiceJobs,
    SubmitSynthesis,
    SynthesisAccepted,
    SynthesisCompleted,
    SynthesisFailed,
    VoiceSnapshot,
)
from timbre_common.contracts.voices import DeleteVoice, GetVoice, ListVoices, RegisterVoice, VoiceList, VoiceRecord
from timbre_common.ids import is_canonical_uuid
from timbre_common.logging import get_logger, scrub_urls
from timbre_common.messaging import RemoteError
from timbre_common.text import SUPPORTED_LANGUAGES

from ..adapters.stream_relay import Stream
from .deps import AdminDep, CallbackAttemptDep, CallerDep, Ctx
from .errors import ApiError, error_responses
from .idempotency import IdempotencyKey, ReplayRef, StoredResponse, about, fingerprint, idempotent
from .multipart import read_form
from .routes_webhooks import endpoint_for_request
from .schemas import (
    CallbackOutcome,
    CompletionCallback,
    CreateKey,
    Health,
    JobAccepted,
    JobOut,
    KeyCreated,
    KeyInfo,
    PurgeOut,
    Readiness,
    SynthesizeRequest,
    UpdateKeyLimits,
    UploadOut,
    VoiceOut,
    VoiceSummary,
    job_timings,
)

log = get_logger(__name__)
router = APIRouter(prefix="/v1")

# What a remote worker reports when the trouble was its own (a GPU, a network), not the request's: another
# attempt, maybe on another container, may well succeed; the dispatcher bounds the attempts.
REMOTE_TRANSIENT_FAILURES = frozenset({"backend_unavailable", "reference_unavailable", "synthesis_failed"})
# The dispatcher's answers when work is piling up: the client is told when to come back.
BACKLOG_REFUSALS = frozenset({"too_many_pending_jobs", "work_queue_full"})
UPLOAD_PURPOSES = ("voice_clone", "stt_input", "watermark_input", "audio_job_input")
UPLOAD_CONTENT_TYPES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "audio/mpeg", "audio/mp3",
                                  "audio/mp4", "audio/x-m4a", "audio/aac", "audio/ogg", "audio/opus", "audio/webm",
                                  "audio/flac", "audio/x-flac"})
AUDIO_CONTENT = {"audio/wav": {}, "audio/mpeg": {}, "audio/ogg": {}, "audio/flac": {}, "audio/L16": {}}


def _header(description: str, schema_type: str = "string") -> dict[str, object]:
    return {"description": description, "schema": {"type": schema_type}}


SYNTHESIS_HEADERS = {
    "X-Cache": _header("HIT (audio from the cache) or MISS (a job was queued)"),
    "X-Voice-Id": _header("The voice that speaks"),
    "X-Backend": _header("The backend that speaks"),
    "X-Synthesis-Time-Ms": _header("Milliseconds the synthesis took; -1 on a miss", "integer"),
    "Idempotent-Replayed": _header("true when this answer is the stored answer to an earlier request"),
}
IDEMPOTENT_REPLAY_HEADERS = {"Idempotent-Replayed": SYNTHESIS_HEADERS["Idempotent-Replayed"]}


def _require_uuid(value: str, code: str, message: str) -> None:
    """An id that cannot name anything is simply not found."""
    if not is_canonical_uuid(value):
        raise ApiError(404, code, message)


# The response headers of a paged list, for the OpenAPI document.
PAGE_HEADERS = {"X-Next-Cursor": _header("Cursor of the next page, when there is one"),
                "Link": _header("The next page, as rel=\"next\"")}


def _link_next_page(response: Response, path: str, cursor: str | None, **params: object) -> None:
    """Point at the next page of a list (nothing on the last)."""
    if cursor is None:
        return
    query = "&".join(f"{k}={v}" for k, v in {**params, "cursor": cursor}.items() if v is not None)
    response.headers["X-Next-Cursor"] = cursor
    response.headers["Link"] = f'<{path}?{query}>; rel="next"'


async def _audio(audio: bytes, fmt: str, headers: dict[str, str], status: int = 200, *,
                 content_type: str | None = None) -> Response:
    """The audio answer. Storage hands out each format encoded once (`content_type` says it is); a WAV from an
    older dispatcher is still encoded here, off the event loop."""
    if content_type is not None:
        return Response(audio, status_code=status, media_type=content_type, headers=headers)
    body, content_type = transcode(audio, fmt) if fmt == "wav" else await asyncio.to_thread(transcode, audio, fmt)
    return Response(body, status_code=status, media_type=content_type, headers=headers)


def _voice_out(v: VoiceRecord) -> VoiceOut:
    return VoiceOut.model_validate(v.model_dump(exclude={"reference_key", "system_voice"}))


# Health and keys -------------------------------------------------------------------------------------
@router.get("/health", response_model=Health, tags=["health"],
            summary="The runnable backends, and whether the database, the broker and every service answer")
async def health(ctx: Ctx) -> Health:
    backends = ctx.backends.available()
    dependencies = await ctx.probe.check() if ctx.probe is not None else {}
    failing = [name for name, state in dependencies.items() if state != "ok"]
    if not backends:
        failing.append("backends")
    return Health(status="degraded" if failing else "ok", backends=backends, dependencies=dependencies,
                  failing=failing)


@router.get("/ready", response_model=Readiness, tags=["health"],
            summary="Readiness for load balancers: 200 while this gateway reaches its database and the broker",
            responses={503: {"model": Readiness, "description": "Not ready: the database or the broker is down"}})
async def ready(ctx: Ctx) -> JSONResponse:
    dependencies = await ctx.probe.check() if ctx.probe is not None else {}
    own = {name: dependencies.get(name, "ok") for name in ("database", "broker")}
    ok = all(state == "ok" for state in own.values())
    return JSONResponse(Readiness(ready=ok, dependencies=own).model_dump(), status_code=200 if ok else 503,
                        headers={} if ok else {"Retry-After": "5"})


@router.post("/keys", status_code=201, response_model=KeyCreated, tags=["keys"],
             summary="Create an API key (admin)",
             responses=error_responses(400, 401, 404, 422, codes={
                 400: ["invalid_json", "invalid_body"], 401: ["invalid_admin_secret"], 404: ["account_not_found"],
                 422: ["invalid_request"]}))
async def create_key(ctx: Ctx, _: AdminDep, body: CreateKey | None = None) -> KeyCreated:
    body = body or CreateKey()
    if body.account_id is not None:
        _require_uuid(body.account_id, "account_not_found", "no such account")
        if not await ctx.accounts.account_exists(body.account_id):
            raise ApiError(404, "account_not_found", "no such account")
    key, row = await ctx.accounts.create_key(label=body.label, account_id=body.account_id,
                                             rate_per_minute=body.rate_per_minute,
                                             max_concurrent=body.max_concurrent)
    log.info("api_key_created", key_id=str(row["key_id"]), account=str(row["account_id"]))
    return KeyCreated(api_key=key, key_id=str(row["key_id"]), account_id=str(row["account_id"]),
                      label=row["label"], created_at=row["created_at"])


def _key_info(row) -> KeyInfo:  # type: ignore[no-untyped-def]
    return KeyInfo(key_id=str(row["key_id"]), account_id=str(row["account_id"]), key_prefix=row["key_prefix"],
                   label=row["label"], created_at=row["created_at"], revoked_at=row["revoked_at"],
                   rate_per_minute=row["rate_per_minute"], max_concurrent=row["max_concurrent"])


@router.get("/keys", response_model=list[KeyInfo], tags=["keys"], summary="List API keys (admin), a page at a time",
            responses={200: {"headers": PAGE_HEADERS}, **error_responses(400, 401, codes={400: ["invalid_cursor"]})})
async def list_keys(ctx: Ctx, _: AdminDep, response: Response, account_id: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=500)] = 100,
                    cursor: Annotated[str | None, Query(max_length=64)] = None) -> list[KeyInfo]:
    if account_id is not None and not is_canonical_uuid(account_id):
        return []
    if cursor is not None and not is_canonical_uuid(cursor):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API handed out")
    rows = await ctx.accounts.list_keys(account_id, limit=limit + 1, after=cursor)
    page = rows[:limit]
    _link_next_page(response, "/v1/keys", str(page[-1]["key_id"]) if len(rows) > limit else None,
                    limit=limit, account_id=account_id)
    return [_key_info(r) for r in page]


@router.patch("/keys/{key_id}", response_model=KeyInfo, tags=["keys"], summary="Change a key's limits (admin)",
              responses=error_responses(400, 401, 404, 422, codes={
                  400: ["invalid_json", "invalid_body"], 401: ["invalid_admin_secret"], 404: ["key_not_found"],
                  422: ["invalid_request"]}))
async def update_key(ctx: Ctx, _: AdminDep, key_id: str, body: UpdateKeyLimits) -> KeyInfo:
    _require_uuid(key_id, "key_not_found", "no such key")
    row = await _change_key(ctx, lambda: ctx.accounts.update_key_limits(
        key_id, body.model_dump(include=body.model_fields_set)))
    if row is None:
        raise ApiError(404, "key_not_found", "no such key")
    log.info("api_key_limits_changed", key_id=key_id, rate_per_minute=row["rate_per_minute"],
             max_concurrent=row["max_concurrent"])
    return _key_info(row)


@router.delete("/keys/{key_id}", status_code=204, tags=["keys"], summary="Revoke an API key (admin)",
               responses=error_responses(401, 404, codes={401: ["invalid_admin_secret"], 404: ["key_not_found"]}))
async def revoke_key(ctx: Ctx, _: AdminDep, key_id: str) -> Response:
    _require_uuid(key_id, "key_not_found", "no such key")
    if await _change_key(ctx, lambda: ctx.accounts.revoke_key(key_id)) is None:
        raise ApiError(404, "key_not_found", "no such key")
    return Response(status_code=204)


async def _change_key(ctx, change: Callable[[], Awaitable[Any]]) -> Any:  # type: ignore[no-untyped-def]
    """Run a change to one key (its row back, or None) and announce account.keys_changed in its transaction; the
    keys held here are dropped at once, those of the other gateway instances by the event."""
    outbox = getattr(ctx, "outbox", None) or ctx.bus
    async with outbox.transaction():
        row = await change()
        if row is not None:
            await outbox.publish(ApiKeysChanged(account_id=str(row["account_id"])))
    if row is not None and (models := getattr(ctx, "read_models", None)) is not None:
        models.forget_account_keys(str(row["account_id"]))
    return row


# Voices ---------------------------------------------------------------------------------------------
VOICE_FORM = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["name"],
        "properties": {
            "name": {"type": "string", "maxLength": 200},
            "ref_audio": {"type": "string", "format": "binary", "description": "PCM WAV, 5-60 s, at most 20 MB"},
            "upload_id": {"type": "string", "description": "An earlier upload, instead of ref_audio"},
            "ref_text": {"type": "string", "description": "Transcript of the reference"},
            "backend": {"type": "string", "enum": list(KNOWN_BACKENDS)},
            "lang": {"type": "string", "enum": list(SUPPORTED_LANGUAGES)},
            "family": {"type": "string"},
        }}}}},
}


@router.post("/voices", status_code=201, response_model=VoiceOut, tags=["voices"], summary="Register a cloned voice",
             openapi_extra=VOICE_FORM, responses={201: {"headers": IDEMPOTENT_REPLAY_HEADERS},
                                                  **error_responses(400, 401, 404, 409, 413, 422, 429, 503, codes={
                                                      400: ["missing_field", "malformed_multipart", "duplicate_field",
                                                            "too_many_parts", "invalid_field", "unexpected_file",
                                                            "invalid_idempotency_key"],
                                                      404: ["upload_not_found"],
                                                      409: ["idempotency_in_progress", "voice_limit_reached"],
                                                      413: ["payload_too_large", "storage_quota_exceeded"],
                                                      422: ["not_wav", "duration_out_of_range", "file_too_large",
                                                            "invalid_backend", "backend_unavailable",
                                                            "unsupported_language", "unsupported_media_type",
                                                            "malformed_wav", "unsupported_format", "truncated",
                                                            "invalid_samples", "idempotency_key_reused"]})})
async def create_voice(request: Request, ctx: Ctx, caller: CallerDep,
                       idempotency_key: IdempotencyKey = None) -> Response:
    form = await read_form(request, file_fields={"ref_audio"}, max_file_bytes=ctx.settings.max_upload_bytes)
    name = form.fields.get("name", "").strip()
    audio = form.files.get("ref_audio")
    upload_id = form.fields.get("upload_id") or None
    if not name:
        raise ApiError(400, "missing_field", "name is required", details={"fields": ["name"]})
    if (audio is None or not audio.data) and not upload_id:
        raise ApiError(400, "missing_field", "ref_audio is required", details={"fields": ["ref_audio"]})
    if audio is not None and audio.content_type and audio.content_type.split(";")[0].strip().lower() not in (
            "audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "application/octet-stream"):
        raise ApiError(422, "not_wav", f"ref_audio must be a WAV file, not {audio.content_type}")
    backend = form.fields.get("backend") or ctx.backends.default_backend("embedded")
    lang = form.fields.get("lang") or "en"
    _check_backend_lang(backend, lang, ctx)
    command = RegisterVoice(account_id=caller.account_id, name=name, backend=backend, lang=lang,
                            ref_text=form.fields.get("ref_text") or None, family=form.fields.get("family") or None,
                            upload_id=upload_id)

    async def register() -> Response:
        record, _ = await ctx.bus.call("voices", command, body=audio.data if audio else None, expect=VoiceRecord)
        return about(JSONResponse(_voice_out(record).model_dump(mode="json"), status_code=201),
                     ReplayRef(voice_id=record.voice_id))

    sent = {"fields": form.fields, "ref_audio": hashlib.sha256(audio.data).hexdigest() if audio else None}
    return await idempotent(ctx, account_id=caller.account_id, key=idempotency_key,
                            request_fingerprint=fingerprint("POST /v1/voices", sent), run=register)


@router.get("/voices", response_model=list[VoiceSummary], tags=["voices"],
            summary="System voices and the voices of this key's account, a page at a time",
            description="System voices lead the first page. When more custom voices follow, the answer carries "
                        "`X-Next-Cursor` and a `Link: <...>; rel=\"next\"` header for the next page.",
            responses={200: {"headers": PAGE_HEADERS},
                       **error_responses(400, 401, 429, 503, codes={400: ["invalid_cursor"]})})
async def list_voices(ctx: Ctx, caller: CallerDep, response: Response,
                      limit: Annotated[int, Query(ge=1, le=500, description="Custom voices per page")] = 100,
                      cursor: Annotated[str | None, Query(max_length=64, description="From the previous page's "
                                                          "Link / X-Next-Cursor header")] = None,
                      ) -> list[VoiceSummary]:
    if cursor is not None and not is_canonical_uuid(cursor):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API handed out")
    reply, _ = await ctx.bus.call("voices", ListVoices(account_id=caller.account_id, limit=limit, after=cursor),
                                  expect=VoiceList)
    _link_next_page(response, "/v1/voices", reply.next_after, limit=limit)
    return [VoiceSummary.model_validate(v.model_dump()) for v in reply.voices]


async def _get_voice(ctx, account_id: str, voice_id: str) -> VoiceRecord:  # type: ignore[no-untyped-def]
    record, _ = await ctx.bus.call("voices", GetVoice(account_id=account_id, voice_id=voice_id), expect=VoiceRecord)
    return record


@router.get("/voices/{voice_id}", response_model=VoiceOut, tags=["voices"], summary="A voice's full record",
            responses=error_responses(401, 404, 429, 503, codes={404: ["voice_not_found"]}))
async def get_voice(ctx: Ctx, caller: CallerDep, voice_id: str) -> VoiceOut:
    return _voice_out(await _get_voice(ctx, caller.account_id, voice_id))


@router.delete("/voices/{voice_id}", status_code=204, tags=["voices"],
               summary="Delete a voice, its reference, its cached audio, and all its jobs and their audio",
               responses=error_responses(401, 403, 404, 429, 503, codes={403: ["system_voice_readonly"],
                                                                           404: ["voice_not_found"]}))
async def delete_voice(ctx: Ctx, caller: CallerDep, voice_id: str) -> Response:
    await ctx.bus.call("voices", DeleteVoice(account_id=caller.account_id, voice_id=voice_id))
    if (models := getattr(ctx, "read_models", None)) is not None:
        models.voice_deleted(voice_id)  # here at once; other instances by voice.deleted
    # Done now so the client sees no job of the voice after the 204; the voice.deleted event repeats it.
    await ctx.bus.call("dispatcher", PurgeVoiceJobs(account_id=caller.account_id, voice_id=voice_id))
    if ctx.idempotency is not None:
        # A retried request must not bring back the voice's record or audio.
        await ctx.idempotency.forget_voice(caller.account_id, voice_id)
    return Response(status_code=204)


# Synthesis ------------------------------------------------------------------------------------------
def _require_known_backend(backend: str) -> None:
    if backend not in KNOWN_BACKENDS:
        raise ApiError(422, "invalid_backend", f"backend must be one of {', '.join(KNOWN_BACKENDS)}")


def _require_known_lang(lang: str) -> None:
    if lang not in SUPPORTED_LANGUAGES:
        raise ApiError(422, "unsupported_language", f"lang must be one of {' '.join(SUPPORTED_LANGUAGES)}")


def _check_backend_lang(backend: str, lang: str, ctx=None) -> None:  # type: ignore[no-untyped-def]
    _require_known_backend(backend)
    if ctx is not None and ctx.backends.recently_lost(backend):
        # Its workers were beating a moment ago (one restarting, say): retry shortly, not a refusal.
        raise ApiError(503, "service_unavailable", f"no worker runs backend {backend} right now; retry shortly",
                       headers={"Retry-After": "5"}, details={"dependency": f"backend {backend}"})
    if ctx is not None and ctx.backends.known_unavailable(backend):
        raise ApiError(422, "backend_unavailable",
                       f"backend {backend} is not running on this deployment; available: "
                       f"{', '.join(ctx.backends.available()) or 'none'}")
    _require_known_lang(lang)
    if lang not in BACKEND_LANGUAGES[backend]:
        raise ApiError(422, "unsupported_language",
                       f"backend {backend} speaks {' '.join(BACKEND_LANGUAGES[backend])}, not {lang}")


@router.post("/synthesize", tags=["synthesis"], status_code=202, summary="Synthesize text in a voice",
             response_model=JobAccepted,
             responses={200: {"content": AUDIO_CONTENT, "description": "Cache hit: the audio (X-Cache: HIT)",
                              "headers": SYNTHESIS_HEADERS | {"X-Job-Id": _header("The job that made the audio")}},
                        202: {"description": "Cache miss: a pending job (X-Cache: MISS)",
                              "headers": SYNTHESIS_HEADERS | {"Location": _header("The job to poll")}},
                        **error_responses(400, 401, 402, 404, 409, 422, 429, 500, 502, 503, 504, codes={
                            400: ["missing_field", "invalid_json", "invalid_body", "invalid_idempotency_key"],
                            402: ["quota_exceeded"], 404: ["voice_not_found"], 409: ["idempotency_in_progress"],
                            422: ["text_too_long", "invalid_backend", "backend_unavailable", "unsupported_language",
                                  "invalid_request", "idempotency_key_reused", "webhook_not_registered"],
                            429: ["rate_limited", "too_many_concurrent_requests", "too_many_pending_jobs"],
                            502: ["worker_lost", "stream_gap"], 503: ["service_unavailable", "work_queue_full"],
                            504: ["stream_timeout"]})})
async def synthesize(ctx: Ctx, caller: CallerDep, body: SynthesizeRequest,
                     idempotency_key: IdempotencyKey = None) -> Response:
    if body.stream:
        from .speech import streamed_synthesis  # speech builds on this module's submit_synthesis

        # A stream cannot be kept and replayed; a repeated streamed request is answered from the cache instead.
        return await streamed_synthesis(ctx, caller, body)

    async def replay_audio(stored: StoredResponse) -> Response:
        """The first answer was audio: read it again (encoded once, kept by storage with the job)."""
        view, audio = await ctx.bus.call("dispatcher", FetchJobAudio(
            account_id=caller.account_id, job_id=stored.job_id or "", response_format=stored.audio_format),
            expect=JobView)
        headers = {k: v for k, v in stored.headers if k.lower() != "content-type"} | {"Idempotent-Replayed": "true"}
        return await _audio(audio or b"", stored.audio_format or "wav", headers, stored.status_code,
                            content_type=view.content_type)

    return await idempotent(ctx, account_id=caller.account_id, key=idempotency_key,
                            request_fingerprint=fingerprint("POST /v1/synthesize", body.model_dump()),
                            run=lambda: _synthesize(ctx, caller, body), replay_audio=replay_audio)


async def _release_hold(ctx, account_id: str, hold_id: str | None) -> None:  # type: ignore[no-untyped-def]
    """Give billing back a quota hold no job will consume; a failure only logs, as the hold expires anyway."""
    if hold_id is None:
        return
    try:
        await ctx.bus.call("billing", ReleaseHold(account_id=account_id, hold_id=hold_id))
    except Exception as exc:  # noqa: BLE001 - the request's own outcome must not depend on this
        log.warning("quota_hold_release_failed", hold_id=hold_id, error=type(exc).__name__)


async def _synthesize(ctx, caller, body: SynthesizeRequest) -> Response:  # type: ignore[no-untyped-def]
    from . import hot_path  # hot_path imports this module

    fast = await hot_path.cache_hit(ctx, caller, body)
    if fast is not None:
        return about(fast, ReplayRef(voice_id=fast.headers["X-Voice-Id"], job_id=fast.headers["X-Job-Id"],
                                     audio_format=body.response_format))
    accepted, audio, headers = await submit_synthesis(ctx, caller, body)
    voice_id = headers["X-Voice-Id"]
    if accepted.cache_hit:
        answer = await _audio(audio or b"", body.response_format, headers, content_type=accepted.content_type)
        return about(answer, ReplayRef(voice_id=voice_id, job_id=accepted.job_id, audio_format=body.response_format))
    return about(JSONResponse({"job_id": accepted.job_id, "status": "pending"}, status_code=202, headers=headers),
                 ReplayRef(voice_id=voice_id))


async def submit_synthesis(ctx, caller, body: SynthesizeRequest, *,  # type: ignore[no-untyped-def]
                           stream: Stream | None = None) -> tuple[SynthesisAccepted, bytes | None, dict[str, str]]:
    """Check, hold quota, and submit to the dispatcher: (its answer, the cached WAV on a hit, the headers).
    With `stream`, a miss's worker sends its pieces to that stream."""
    text = body.text
    if not text.strip():
        raise ApiError(400, "missing_field", "text is required", details={"fields": ["text"]})
    if len(text) > ctx.settings.max_text_chars:
        raise ApiError(422, "text_too_long", f"text is longer than {ctx.settings.max_text_chars} characters")
    # Names nobody knows are refused before any service is asked (or any quota held).
    if body.backend is not None:
        _require_known_backend(body.backend)
    if body.lang is not None:
        _require_known_lang(body.lang)
    webhook_id = await endpoint_for_request(ctx, caller.account_id, body.webhook_url) if body.webhook_url else None
    # Two independent questions, asked at once; a voice error still wins over a quota one. The quota answer
    # reserves the characters (a hold) so a burst of requests cannot all pass on the same usage.
    voice_answer, quota_answer = await asyncio.gather(
        _get_voice(ctx, caller.account_id, body.voice_id),
        ctx.bus.call("billing", CheckQuota(account_id=caller.account_id, characters=len(text), reserve=True),
                     expect=QuotaDecision),
        return_exceptions=True)
    hold_id = None if isinstance(quota_answer, BaseException) else quota_answer[0].hold_id
    if isinstance(voice_answer, BaseException):
        await _release_hold(ctx, caller.account_id, hold_id)
        raise voice_answer
    voice = voice_answer
    backend = body.backend or voice.backend
    lang = body.lang or voice.lang
    try:
        _check_backend_lang(backend, lang, ctx)
    except ApiError:
        await _release_hold(ctx, caller.account_id, hold_id)
        raise
    if isinstance(quota_answer, BaseException):
        raise quota_answer
    quota, _ = quota_answer
    if not quota.allowed:
        raise ApiError(402, "quota_exceeded", quota.reason or "the plan's character quota is used up",
                       details={"remaining": quota.remaining})
    snapshot = VoiceSnapshot(voice_id=voice.voice_id, backend=voice.backend, lang=voice.lang, kind=voice.kind,
                             reference_key=voice.reference_key, ref_text=voice.ref_text,
                             system_voice=voice.system_voice, profile=voice.profile)
    try:
        accepted, audio = await ctx.bus.call(
            "dispatcher", SubmitSynthesis(account_id=caller.account_id, voice=snapshot, text=text, lang=lang,
                                          backend=backend, response_format=body.response_format, hold_id=hold_id,
                                          stream_to=stream.target if stream else None,
                                          stream_id=stream.stream_id if stream else None,
                                          timestamps=body.timestamps),
            expect=SynthesisAccepted)
    except RemoteError as exc:
        # A refusal made no job; a timeout or a server error may have, and that job consumes the hold (else
        # it expires), so only the refusal gives it back now. A full work queue failed its job, which released it.
        if exc.status < 500:
            await _release_hold(ctx, caller.account_id, hold_id)
        if exc.code in BACKLOG_REFUSALS:
            raise ApiError(exc.status, exc.code, exc.message,
                           headers={"Retry-After": str(exc.details.get("retry_after_s", 5))}) from None
        raise
    if not accepted.hold_attached:
        # A cache hit or a joined job in flight: nothing new is billed, so nothing stays held.
        await _release_hold(ctx, caller.account_id, hold_id)
    headers = {"X-Voice-Id": voice.voice_id, "X-Backend": backend}
    if accepted.cache_hit:
        headers |= {"X-Cache": "HIT", "X-Synthesis-Time-Ms": str(accepted.synthesis_ms),
                    "X-Job-Id": accepted.job_id or ""}
        if accepted.expires_at:
            headers["X-Expires-At"] = accepted.expires_at.isoformat()
        return accepted, audio, headers
    if (models := getattr(ctx, "read_models", None)) is not None:
        # A miss (or a request for word timestamps) makes a new job for this key: what this instance knew of the
        # key answers no more; job.ready teaches it the new one.
        models.forget_cache_key(caller.account_id, accepted.cache_key)
    if webhook_id is not None and accepted.job_id:
        await ctx.webhooks.attach_job(accepted.job_id, webhook_id, caller.account_id)
    headers |= {"X-Cache": "MISS", "X-Synthesis-Time-Ms": "-1", "Location": f"/v1/jobs/{accepted.job_id}"}
    return accepted, None, headers


@router.get("/jobs/{job_id}", response_model=JobOut, response_model_exclude_none=True, tags=["synthesis"],
            summary="Poll a synthesis job",
            responses=error_responses(401, 404, 429, 503, codes={404: ["job_not_found"]}))
async def get_job(ctx: Ctx, caller: CallerDep, job_id: str) -> JobOut:
    from . import hot_path

    if (known := await hot_path.job_view(ctx, caller, job_id)) is None:
        view, _ = await ctx.bus.call("dispatcher", GetJob(account_id=caller.account_id, job_id=job_id),
                                     expect=JobView)
        known = view.model_dump()
    return JobOut.model_validate({**known, "timings": job_timings(known)})


@router.get("/jobs/{job_id}/audio", tags=["synthesis"], summary="Download a ready job's audio",
            response_class=Response,
            responses={200: {"content": AUDIO_CONTENT, "description": "The audio",
                             "headers": {"X-Job-Id": _header("The job"), "X-Voice-Id": _header("The voice"),
                                         "X-Backend": _header("The backend that spoke"),
                                         "X-Expires-At": _header("When the audio is deleted")}},
                       **error_responses(401, 404, 410, 429, 500, 503,
                                         codes={404: ["job_not_found", "job_not_ready"], 410: ["audio_expired"],
                                                500: ["audio_missing"]})})
async def get_job_audio(ctx: Ctx, caller: CallerDep, job_id: str) -> Response:
    from . import hot_path

    fast = await hot_path.job_audio(ctx, caller, job_id)
    if fast is not None:
        return fast
    view, audio = await ctx.bus.call("dispatcher", FetchJobAudio(account_id=caller.account_id, job_id=job_id),
                                     expect=JobView)
    headers = {"X-Job-Id": view.job_id, "X-Voice-Id": view.voice_id, "X-Backend": view.backend}
    if view.expires_at:
        headers["X-Expires-At"] = view.expires_at.isoformat()
    return await _audio(audio or b"", view.response_format, headers, content_type=view.content_type)


def _callback_body(raw: bytes) -> CompletionCallback:
    """The callback's JSON body, with the same 400/422 answers as a body FastAPI parses."""
    try:
        return CompletionCallback.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "model_type" and not e["loc"] for e in errors):
            raise ApiError(400, "invalid_body", "the request body must be a JSON object") from None
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


CALLBACK_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": CompletionCallback.model_json_schema()}}}}


@router.post("/jobs/{job_id}/complete", response_model=CallbackOutcome, tags=["internal"],
             summary="Completion callback of remote GPU workers (bearer: the token of this job and attempt)",
             openapi_extra=CALLBACK_BODY,
             responses=error_responses(400, 401, 404, 413, 422, codes={
                 400: ["invalid_json", "invalid_body", "missing_field", "job_id_mismatch"],
                 401: ["invalid_callback_token"], 413: ["payload_too_large"],
                 422: ["invalid_request", "invalid_audio"]}))
async def complete_job(request: Request, ctx: Ctx, attempt: CallbackAttemptDep, job_id: str) -> CallbackOutcome:
    # Read by hand, so the token (a dependency) is checked before a byte of the body is read or parsed.
    body = _callback_body(await request.body())
    if body.job_id != job_id:
        raise ApiError(400, "job_id_mismatch", "job_id in the body differs from the path")
    owner, _ = await ctx.bus.call("dispatcher", LookupJob(job_id=job_id))
    if owner.status != "pending" or (owner.attempt is not None and attempt != owner.attempt):
        # A finished job, or an attempt the job has moved past (its deadline handed it out again).
        log.info("callback_replay_ignored", job_id=job_id, status=owner.status, attempt=attempt,
                 current_attempt=owner.attempt)
        return CallbackOutcome(status="ignored")
    if body.wav_b64:
        try:
            wav = base64.b64decode(body.wav_b64, validate=True)
            # Every sample decoded now (NaN or infinite floats refused), not only the header: audio accepted here
            # must encode later in any format.
            samples, sample_rate = await asyncio.to_thread(decode_wav, wav)
        except (binascii.Error, ValueError, AudioError) as exc:
            raise ApiError(422, "invalid_audio", f"wav_b64 is not a valid base64 WAV: {exc}") from None
        if samples.size == 0:
            raise ApiError(422, "invalid_audio", "wav_b64 holds no samples")
        seconds = body.audio_seconds or samples.shape[0] / sample_rate
        synthesis_ms = body.synthesis_ms or 0
        await ctx.bus.publish(SynthesisCompleted(
            job_id=job_id, account_id=owner.account_id, voice_id=owner.voice_id, backend=owner.backend,
            sample_rate=sample_rate, audio_seconds=round(seconds, 3), synthesis_ms=synthesis_ms,
            rtf=body.rtf if body.rtf is not None else (synthesis_ms / 1000 / seconds if seconds else 0.0),
            job_created_at=owner.created_at, details={"executor": "modal", **(
                {"words": [w.model_dump() for w in body.words]} if body.words is not None else {})}), body=wav)
    else:
        code = body.error_code or "synthesis_failed"
        reason = scrub_urls(body.error or "the GPU worker reported no audio")[:2000]
        await ctx.bus.publish(SynthesisFailed(job_id=job_id, account_id=owner.account_id, code=code, reason=reason,
                                              retryable=code in REMOTE_TRANSIENT_FAILURES, attempt=attempt))
    return CallbackOutcome(status="accepted")


# Uploads, usage, account ----------------------------------------------------------------------------
UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)}}}}}}}


@router.post("/uploads", status_code=201, response_model=UploadOut, tags=["uploads"], openapi_extra=UPLOAD_FORM,
             summary="Upload a file with a retention purpose",
             responses=error_responses(400, 401, 409, 413, 422, 429, 503, codes={
                 409: ["upload_limit_reached"], 413: ["payload_too_large", "storage_quota_exceeded"]}))
async def create_upload(request: Request, ctx: Ctx, caller: CallerDep) -> UploadOut:
    form = await read_form(request, file_fields={"file"}, max_file_bytes=ctx.settings.max_upload_bytes)
    part = form.files.get("file")
    if part is None or not part.data:
        raise ApiError(400, "missing_field", "file is required", details={"fields": ["file"]})
    purpose = form.fields.get("purpose") or None
    if purpose is not None and purpose not in UPLOAD_PURPOSES:
        raise ApiError(422, "invalid_purpose", f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}")
    # The type (and so the stored key's extension) is what the bytes are, never what the client's file name or
    # header claims; bytes of no audio container Timbre knows are stored as plain bytes, never as a web page.
    sniffed = sniff_content_type(part.data)
    content_type = sniffed if sniffed in UPLOAD_CONTENT_TYPES else "application/octet-stream"
    record, _ = await ctx.bus.call("storage", PutUpload(account_id=caller.account_id, upload_id=str(uuid.uuid4()),
                                                        purpose=purpose, content_type=content_type,
                                                        filename=(part.filename or None)),
                                   body=part.data, expect=UploadRecord)
    return UploadOut.model_validate(record.model_dump())


@router.get("/usage", response_model=UsageReport, tags=["billing"], summary="Character usage this billing period",
            responses=error_responses(401, 429, 503))
async def usage(ctx: Ctx, caller: CallerDep) -> UsageReport:
    report, _ = await ctx.bus.call("billing", GetUsage(account_id=caller.account_id), expect=UsageReport)
    return report


def _purge_out(row) -> PurgeOut:  # type: ignore[no-untyped-def]
    confirmed = dict(row["confirmed"] or {})
    if row["completed_at"]:
        status = "completed"
    elif row.get("failed_at"):
        status = "failed"
    else:
        status = "pending"
    missing = list(row.get("missing") or []) if status == "failed" else \
        sorted(set(PURGING_SERVICES) - set(confirmed))
    return PurgeOut(purge_id=str(row["purge_id"]), account_id=row["account_id"], status=status,
                    confirmed=confirmed, missing=missing, failed_at=row.get("failed_at"))


async def _purge(ctx, account_id: str) -> PurgeOut:  # type: ignore[no-untyped-def]
    # The purge row and its request commit together (the outbox): a crash cannot leave a purge nobody was asked.
    outbox = getattr(ctx, "outbox", None) or ctx.bus
    async with outbox.transaction():
        purge_id = await ctx.accounts.start_purge(account_id)
        await outbox.publish(AccountPurgeRequested(account_id=account_id, purge_id=purge_id))
    if (models := getattr(ctx, "read_models", None)) is not None:
        models.forget_account(account_id)  # here at once; other instances by account.purge_requested
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.settings.purge_wait_s
    row = await ctx.accounts.get_purge(purge_id)
    while row["completed_at"] is None and loop.time() < deadline:
        await asyncio.sleep(0.1)
        row = await ctx.accounts.get_purge(purge_id)
    return _purge_out(row)


@router.delete("/account", response_model=PurgeOut, tags=["account"],
               summary="Delete the caller's account: every object and every row, in every service",
               responses={202: {"model": PurgeOut, "description": "Purge still running"},
                          **error_responses(401, 429)})
async def delete_account(ctx: Ctx, caller: CallerDep) -> Response:
    out = await _purge(ctx, caller.account_id)
    return JSONResponse(out.model_dump(), status_code=200 if out.status == "completed" else 202)


@router.delete("/admin/accounts/{account_id}", response_model=PurgeOut, tags=["account"],
               summary="Purge any account (admin)", responses=error_responses(401, 404))
async def purge_account(ctx: Ctx, _: AdminDep, account_id: str) -> Response:
    _require_uuid(account_id, "account_not_found", "no such account")
    # The canonical spelling: every service and read model names the account as the database returns it.
    account_id = account_id.lower()
    if not await ctx.accounts.account_exists(account_id):
        raise ApiError(404, "account_not_found", "no such account")
    out = await _purge(ctx, account_id)
    return JSONResponse(out.model_dump(), status_code=200 if out.status == "completed" else 202)


@router.get("/admin/purges/{purge_id}", response_model=PurgeOut, tags=["account"], summary="A purge's progress (admin)",
            responses=error_responses(401, 404))
async def get_purge(ctx: Ctx, _: AdminDep, purge_id: str) -> PurgeOut:
    _require_uuid(purge_id, "purge_not_found", "no such purge")
    row = await ctx.accounts.get_purge(purge_id)
    if row is None:
        raise ApiError(404, "purge_not_found", "no such purge")
    return _purge_out(row)


