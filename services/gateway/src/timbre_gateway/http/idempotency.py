"""Idempotency-Key on POST routes: a retry of a request gets the first answer back and creates nothing."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header
from starlette.responses import Response

from ..adapters.idempotency import StoredResponse
from .errors import ApiError

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


def _valid_key(key: str) -> bool:
    return 1 <= len(key) <= 255 and all(32 <= ord(c) < 127 for c in key)


async def idempotent(ctx: Any, *, account_id: str, key: str | None, request_fingerprint: str,
                     run: Callable[[], Awaitable[Response]]) -> Response:
    """Run the request once per (account, key); replay the stored answer to a retry."""
    store = getattr(ctx, "idempotency", None)
    if key is None or store is None:
        return await run()
    if not _valid_key(key):
        raise ApiError(400, "invalid_idempotency_key",
                       "Idempotency-Key must be 1-255 printable ASCII characters")
    claim = await store.begin(account_id, key, request_fingerprint, ttl_s=ctx.settings.idempotency_ttl_s)
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
        response = Response(stored.body, status_code=stored.status_code)
        for name, value in stored.headers:
            response.headers.append(name, value)
        response.headers["Idempotent-Replayed"] = "true"
        return response
    try:
        response = await run()
    except BaseException:
        await store.abandon(account_id, key)
        raise
    if response.status_code >= 300:
        await store.abandon(account_id, key)
        return response
    headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _NOT_REPLAYED]
    await store.complete(account_id, key, StoredResponse(response.status_code, headers, bytes(response.body)))
    return response
