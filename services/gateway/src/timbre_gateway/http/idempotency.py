"""Idempotency-Key on POST routes: a retry of a request gets the first answer back and creates nothing."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Header
from starlette.responses import Response

from timbre_common.logging import get_logger

from ..adapters.idempotency import StoredResponse
from .errors import ApiError

log = get_logger(__name__)

IDEMPOTENCY_DOC = (
    "Any string of 1-255 printable ASCII characters. A retry with the same key and the same request gets the "
    "first answer back (with `Idempotent-Replayed: true`) and creates nothing new; the same key with a "
    "different request is refused (422), and while the first is still running the retry gets 409. Keys are "
    "scoped to the account and kept for 24 hours. Only successful answers are kept.")

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", description=IDEMPOTENCY_DOC)]

# Headers a replay must not copy: the transport's own, and those that describe this request, not the first.
_NOT_REPLAYED = {"content-length", "x-request-id", "x-ratelimit-limit", "x-ratelimit-remaining",
                 "idempotent-replayed"}


def fingerprint(route: str, payload: Any) -> str:
    """A stable digest of what the request asks (parsed: a new multipart boundary is the same request)."""
    canonical = json.dumps({"route": route, "payload": payload}, sort_keys=True, separators=(",", ":"),
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ReplayRef:
    """What an answer is about, set by the route on its response: the voice (its deletion forgets the answer)
    and, for audio, the job and format a replay re-reads instead of keeping the bytes."""

    voice_id: str | None = None
    job_id: str | None = None
    audio_format: str | None = None


def about(response: Response, ref: ReplayRef) -> Response:
    """Mark `response` with what it is about (see ReplayRef)."""
    response.idempotency_ref = ref  # type: ignore[attr-defined]
    return response


AudioReplay = Callable[[StoredResponse], Awaitable[Response]]


def _valid_key(key: str) -> bool:
    return 1 <= len(key) <= 255 and all(32 <= ord(c) < 127 for c in key)


async def _keep_leased(store: Any, account_id: str, key: str, lease: str, lease_s: float) -> None:
    """Renew the claim while the request runs: a crash stops the renewals and the claim lapses within lease_s."""
    while True:
        await asyncio.sleep(lease_s / 3)
        try:
            if not await store.renew(account_id, key, lease, lease_s=lease_s):
                return
        except Exception as exc:  # noqa: BLE001 - the next renewal may succeed; the request goes on either way
            log.warning("idempotency_lease_renewal_failed", error=type(exc).__name__)


def _replayed(stored: StoredResponse) -> Response:
    response = Response(stored.body, status_code=stored.status_code)
    for name, value in stored.headers:
        response.headers.append(name, value)
    response.headers["Idempotent-Replayed"] = "true"
    return response


async def idempotent(ctx: Any, *, account_id: str, key: str | None, request_fingerprint: str,
                     run: Callable[[], Awaitable[Response]], replay_audio: AudioReplay | None = None) -> Response:
    """Run the request once per (account, key); replay the stored answer to a retry.

    An audio answer (one marked with a ReplayRef naming a job) is stored without its bytes: `replay_audio`
    reads them again for a retry.
    """
    store = getattr(ctx, "idempotency", None)
    if key is None or store is None:
        return await run()
    if not _valid_key(key):
        raise ApiError(400, "invalid_idempotency_key",
                       "Idempotency-Key must be 1-255 printable ASCII characters")
    lease_s = ctx.settings.idempotency_lease
    claim = await store.begin(account_id, key, request_fingerprint, ttl_s=ctx.settings.idempotency_ttl_s,
                              lease_s=lease_s)
    if claim.outcome == "mismatch":
        raise ApiError(422, "idempotency_key_reused",
                       "this Idempotency-Key was already used for a different request")
    if claim.outcome == "in_progress":
        raise ApiError(409, "idempotency_in_progress",
                       "a request with this Idempotency-Key is still being processed; retry shortly",
                       headers={"Retry-After": "1"})
    if claim.outcome == "replay":
        stored = claim.stored
        assert stored is not None
        if stored.audio_format is not None and replay_audio is not None:
            return await replay_audio(stored)
        return _replayed(stored)
    renewals = asyncio.create_task(_keep_leased(store, account_id, key, claim.lease, lease_s))
    try:
        response = await run()
    except BaseException:
        await store.abandon(account_id, key, lease=claim.lease)
        raise
    finally:
        renewals.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewals
    if response.status_code >= 300:
        await store.abandon(account_id, key, lease=claim.lease)
        return response
    headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _NOT_REPLAYED]
    ref: ReplayRef = getattr(response, "idempotency_ref", None) or ReplayRef()
    body = b"" if ref.audio_format is not None else bytes(response.body)
    await store.complete(account_id, key, StoredResponse(response.status_code, headers, body, voice_id=ref.voice_id,
                                                         job_id=ref.job_id, audio_format=ref.audio_format),
                         lease=claim.lease)
    return response
