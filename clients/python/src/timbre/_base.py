"""What the sync and async clients share: settings, the retry policy, turning answers into models or errors."""
from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any

import httpx

from ._errors import APIError, NotFoundError, error_for
from .models import Audio

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0
USER_AGENT = "timbre-python/0.1.0"
# Answers worth another try: the platform was busy (429), or failed or could not reach a backing service.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Routes that take an Idempotency-Key: a retried POST there never creates twice, so it is retried like a GET.
IDEMPOTENT_POSTS = ("/v1/voices", "/v1/synthesize")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with jitter; `Retry-After` wins when the API sends it (capped)."""

    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 60.0

    def delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after_s)
        base = min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s)
        return base * (0.5 + random.random() / 2)


def resolve_credentials(api_key: str | None, base_url: str | None) -> tuple[str | None, str]:
    """Arguments first, then TIMBRE_API_KEY / TIMBRE_BASE_URL, then the local default URL."""
    key = api_key or os.environ.get("TIMBRE_API_KEY") or None
    url = (base_url or os.environ.get("TIMBRE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    return key, url


def new_idempotency_key() -> str:
    return f"timbre-py-{uuid.uuid4()}"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date)."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - datetime.now(when.tzinfo)).total_seconds(), 0.0)


def retryable(method: str, path: str, headers: dict[str, str], status: int | None) -> bool:
    """Whether this failure may be retried without risk of doing the work twice.

    `status` None is a connection error. GET and DELETE are safe; a POST is safe with an Idempotency-Key, or when
    the API refused it before doing anything (429; 409 idempotency_in_progress is handled by the caller).
    """
    safe = method in ("GET", "HEAD", "DELETE", "PUT") or "Idempotency-Key" in headers
    if status is None:
        return safe
    if status == 429:
        return True
    return safe and status in RETRY_STATUSES


def raise_for_status(response: httpx.Response, body: Any) -> None:
    if response.status_code < 400:
        return
    raise error_for(response.status_code, body, request_id=response.headers.get("x-request-id"),
                    retry_after=parse_retry_after(response.headers.get("retry-after")))


def json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def is_retry_in_progress(response: httpx.Response, body: Any) -> bool:
    """409 idempotency_in_progress: the first request with this key is still running; its answer will come."""
    return (response.status_code == 409 and isinstance(body, dict)
            and (body.get("error") or {}).get("code") == "idempotency_in_progress")


def audio_from(response: httpx.Response, content: bytes) -> Audio:
    h = response.headers
    cache = h.get("x-cache")
    return Audio(content=content, content_type=h.get("content-type", "application/octet-stream"),
                 job_id=h.get("x-job-id") or None, voice_id=h.get("x-voice-id"), backend=h.get("x-backend"),
                 cache=cache if cache in ("HIT", "MISS") else None, expires_at=h.get("x-expires-at") or None)


def read_audio_source(source: str | Path | bytes | IO[bytes]) -> tuple[str, bytes]:
    """(file name, bytes) of a path, bytes or an open binary file."""
    if isinstance(source, bytes | bytearray | memoryview):
        return "reference.wav", bytes(source)
    if isinstance(source, str | Path):
        path = Path(source)
        return path.name, path.read_bytes()
    data = source.read()
    return Path(getattr(source, "name", "reference.wav")).name, data


def synthesis_body(voice: str, text: str, *, lang: str | None, backend: str | None, response_format: str,
                   webhook_url: str | None, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"voice_id": voice, "text": text, "response_format": response_format}
    for name, value in (("lang", lang), ("backend", backend), ("webhook_url", webhook_url)):
        if value is not None:
            body[name] = value
    if stream:
        body["stream"] = True
    return body


def stream_unsupported(exc: APIError) -> bool:
    """An API that predates streamed synthesis refuses the `stream` field: ask again without it."""
    return exc.status == 422 and exc.code == "invalid_request" and "stream" in exc.message


def pick_voice(voices: list[Any], name_or_id: str) -> Any:
    """The voice with this id, else the one with this name (custom voices before system ones)."""
    for voice in voices:
        if voice.voice_id == name_or_id:
            return voice
    named = [v for v in voices if v.name == name_or_id]
    named.sort(key=lambda v: v.kind != "custom")
    if not named:
        raise NotFoundError(404, "voice_not_found", f"no voice is called or numbered {name_or_id!r}")
    return named[0]


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]
