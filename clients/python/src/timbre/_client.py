"""The synchronous client: `Timbre(api_key=..., base_url=...)`."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx

from . import webhooks as _webhooks
from ._base import (
    DEFAULT_TIMEOUT_S,
    IDEMPOTENT_POSTS,
    USER_AGENT,
    RetryPolicy,
    audio_from,
    chunks,
    is_retry_in_progress,
    json_body,
    new_idempotency_key,
    parse_retry_after,
    pick_voice,
    raise_for_status,
    read_audio_source,
    resolve_credentials,
    retryable,
    stream_unsupported,
    synthesis_body,
)
from ._errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    JobFailedError,
    WaitTimeoutError,
)
from .models import (
    ApiKey,
    ApiKeyCreated,
    Audio,
    Health,
    Job,
    Purge,
    Upload,
    Usage,
    Voice,
    Webhook,
    WebhookCreated,
    WebhookDelivery,
    WebhookEvent,
)

ProgressCallback = Callable[[Job, float], Any]
CHUNK_BYTES = 16 * 1024


class Timbre:
    """A client of the Timbre API.

    The key and URL come from the arguments, else TIMBRE_API_KEY and TIMBRE_BASE_URL. Admin calls (`keys`) use
    `admin_secret` (or TIMBRE_ADMIN_SECRET) when given. Failures that are safe to retry (429 honouring
    Retry-After, 5xx, connection errors) are retried `max_retries` times with back-off; POSTs that create
    (voices, synthesis) carry an Idempotency-Key, so a retry never creates twice.
    """

    def __init__(self, api_key: str | None = None, *, base_url: str | None = None, admin_secret: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = 3,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.api_key, self.base_url = resolve_credentials(api_key, base_url)
        self.admin_secret = admin_secret or os.environ.get("TIMBRE_ADMIN_SECRET") or None
        self.retry = RetryPolicy(max_retries=max_retries)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport,
                                  headers={"User-Agent": USER_AGENT})
        self.voices = Voices(self)
        self.speech = Speech(self)
        self.jobs = Jobs(self)
        self.uploads = Uploads(self)
        self.usage = UsageResource(self)
        self.account = Account(self)
        self.keys = Keys(self)
        self.webhooks = Webhooks(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Timbre:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> Health:
        return Health.model_validate(self._json("GET", "/v1/health", auth=False))

    # Transport -------------------------------------------------------------------------------------
    def _headers(self, *, admin: bool, auth: bool, idempotency_key: str | None) -> dict[str, str]:
        headers: dict[str, str] = {}
        token = (self.admin_secret or self.api_key) if admin else self.api_key
        if auth:
            if not token:
                raise AuthenticationError(401, "missing_api_key",
                                          "no API key: pass api_key= or set TIMBRE_API_KEY")
            headers["Authorization"] = f"Bearer {token}"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return headers

    def _send(self, method: str, path: str, *, admin: bool = False, auth: bool = True,
              idempotency_key: str | None = None, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """One call with the retry policy; the answer (open, when `stream`) or the API's error raised."""
        if method == "POST" and path in IDEMPOTENT_POSTS and idempotency_key is None:
            idempotency_key = new_idempotency_key()
        headers = self._headers(admin=admin, auth=auth, idempotency_key=idempotency_key)
        retry = 0
        while True:
            try:
                request = self._http.build_request(method, path, headers=headers, **kwargs)
                response = self._http.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                if retry < self.retry.max_retries and retryable(method, path, headers, None):
                    retry += 1
                    time.sleep(self.retry.delay(retry, None))
                    continue
                raise APITimeoutError(f"{method} {path}: no answer in time ({exc})") from exc
            except httpx.TransportError as exc:
                if retry < self.retry.max_retries and retryable(method, path, headers, None):
                    retry += 1
                    time.sleep(self.retry.delay(retry, None))
                    continue
                raise APIConnectionError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            if response.status_code < 400:
                return response
            if stream:
                response.read()
                response.close()
            body = json_body(response)
            again = retryable(method, path, headers, response.status_code) or is_retry_in_progress(response, body)
            if again and retry < self.retry.max_retries:
                retry += 1
                time.sleep(self.retry.delay(retry, parse_retry_after(response.headers.get("retry-after"))))
                continue
            raise_for_status(response, body)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        return json_body(response) if response.content else None


class Voices:
    def __init__(self, client: Timbre) -> None:
        self._c = client

    def create(self, audio: str | Path | bytes | IO[bytes] | None = None, *, name: str, text: str | None = None,
               backend: str | None = None, lang: str | None = None, family: str | None = None,
               upload_id: str | None = None, idempotency_key: str | None = None) -> Voice:
        """Clone a voice from a 5-60 s WAV (a path, bytes or an open file) or an earlier upload."""
        fields = {k: v for k, v in {"name": name, "ref_text": text, "backend": backend, "lang": lang,
                                    "family": family, "upload_id": upload_id}.items() if v is not None}
        files = None
        if audio is not None:
            filename, data = read_audio_source(audio)
            files = {"ref_audio": (filename, data, "audio/wav")}
        return Voice.model_validate(self._c._json("POST", "/v1/voices", data=fields, files=files,
                                                  idempotency_key=idempotency_key))

    def iter(self, *, page_size: int = 100) -> Iterator[Voice]:
        """Every voice (system voices first), fetched a page at a time."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size, **({"cursor": cursor} if cursor else {})}
            response = self._c._send("GET", "/v1/voices", params=params)
            yield from (Voice.model_validate(v) for v in response.json())
            cursor = response.headers.get("x-next-cursor")
            if not cursor:
                return

    def list(self, *, page_size: int = 100) -> list[Voice]:
        return list(self.iter(page_size=page_size))

    def get(self, voice_id: str) -> Voice:
        return Voice.model_validate(self._c._json("GET", f"/v1/voices/{voice_id}"))

    def find(self, name_or_id: str) -> Voice:
        """A voice by id or by name; NotFoundError when there is none."""
        return pick_voice(self.list(), name_or_id)

    def delete(self, voice_id: str) -> None:
        self._c._send("DELETE", f"/v1/voices/{voice_id}")


class Jobs:
    def __init__(self, client: Timbre) -> None:
        self._c = client

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._c._json("GET", f"/v1/jobs/{job_id}"))

    def wait(self, job_id: str, *, timeout: float = 600.0, poll_interval: float = 0.25, max_interval: float = 2.0,
             on_progress: ProgressCallback | None = None, raise_on_failure: bool = True) -> Job:
        """Poll until the job is ready or failed; `on_progress(job, elapsed_s)` after every poll.

        JobFailedError for a failed job (unless `raise_on_failure=False`), WaitTimeoutError past `timeout`.
        """
        started = time.monotonic()
        interval = poll_interval
        while True:
            job = self.get(job_id)
            elapsed = time.monotonic() - started
            if on_progress is not None:
                on_progress(job, elapsed)
            if job.status == "failed" and raise_on_failure:
                raise JobFailedError(job)
            if job.done:
                return job
            if elapsed + interval > timeout:
                raise WaitTimeoutError(job, timeout)
            time.sleep(interval)
            interval = min(interval * 1.5, max_interval)

    def audio(self, job_id: str) -> Audio:
        response = self._c._send("GET", f"/v1/jobs/{job_id}/audio")
        return audio_from(response, response.content)


class Speech:
    def __init__(self, client: Timbre) -> None:
        self._c = client

    def create(self, text: str, *, voice: str, lang: str | None = None, backend: str | None = None,
               response_format: str = "wav", webhook_url: str | None = None,
               idempotency_key: str | None = None) -> Audio | Job:
        """Audio at once on a cache hit, else the pending Job (wait for it with `jobs.wait`)."""
        body = synthesis_body(voice, text, lang=lang, backend=backend, response_format=response_format,
                              webhook_url=webhook_url)
        response = self._c._send("POST", "/v1/synthesize", json=body, idempotency_key=idempotency_key)
        if response.status_code == 202:
            return Job.model_validate(response.json())
        return audio_from(response, response.content)

    def generate(self, text: str, *, voice: str, on_progress: ProgressCallback | None = None,
                 timeout: float = 600.0, **options: Any) -> Audio:
        """The audio, whether from the cache or from a job waited for."""
        result = self.create(text, voice=voice, **options)
        if isinstance(result, Audio):
            return result
        self._c.jobs.wait(result.job_id, on_progress=on_progress, timeout=timeout)
        return self._c.jobs.audio(result.job_id)

    def stream(self, text: str, *, voice: str, lang: str | None = None, backend: str | None = None,
               response_format: str = "wav", chunk_size: int = CHUNK_BYTES,
               on_progress: ProgressCallback | None = None, timeout: float = 600.0) -> Iterator[bytes]:
        """Audio bytes as they arrive. A streamed answer is passed through as it comes; an API that answers with
        a job instead (or does not stream) is waited for, and its audio yielded in pieces."""
        body = synthesis_body(voice, text, lang=lang, backend=backend, response_format=response_format,
                              webhook_url=None, stream=True)
        try:
            response = self._c._send("POST", "/v1/synthesize", json=body, stream=True)
        except APIError as exc:
            if not stream_unsupported(exc):
                raise
            body.pop("stream")
            response = self._c._send("POST", "/v1/synthesize", json=body, stream=True)
        try:
            if response.status_code == 202:
                response.read()
                job = Job.model_validate(response.json())
            else:
                yield from response.iter_bytes(chunk_size)
                return
        finally:
            response.close()
        self._c.jobs.wait(job.job_id, on_progress=on_progress, timeout=timeout)
        yield from chunks(self._c.jobs.audio(job.job_id).content, chunk_size)


class Uploads:
    def __init__(self, client: Timbre) -> None:
        self._c = client

    def create(self, file: str | Path | bytes | IO[bytes], *, purpose: str | None = None,
               content_type: str = "audio/wav") -> Upload:
        filename, data = read_audio_source(file)
        fields = {"purpose": purpose} if purpose else {}
        return Upload.model_validate(self._c._json("POST", "/v1/uploads", data=fields,
                                                   files={"file": (filename, data, content_type)}))


class UsageResource:
    def __init__(self, client: Timbre) -> None:
        self._c = client

    def get(self) -> Usage:
        return Usage.model_validate(self._c._json("GET", "/v1/usage"))

    __call__ = get


class Account:
    def __init__(self, client: Timbre) -> None:
        self._c = client

    def delete(self) -> Purge:
        """Delete the caller's account everywhere: every object and row. The key stops working."""
        return Purge.model_validate(self._c._json("DELETE", "/v1/account"))


class Keys:
    """API keys (admin: `admin_secret`)."""

    def __init__(self, client: Timbre) -> None:
        self._c = client

    def create(self, *, label: str | None = None, account_id: str | None = None,
               rate_per_minute: int | None = None, max_concurrent: int | None = None) -> ApiKeyCreated:
        body = {k: v for k, v in {"label": label, "account_id": account_id, "rate_per_minute": rate_per_minute,
                                  "max_concurrent": max_concurrent}.items() if v is not None}
        return ApiKeyCreated.model_validate(self._c._json("POST", "/v1/keys", json=body, admin=True))

    def list(self, *, account_id: str | None = None) -> list[ApiKey]:
        out: list[ApiKey] = []
        cursor: str | None = None
        while True:
            params = {k: v for k, v in {"account_id": account_id, "cursor": cursor, "limit": 500}.items() if v}
            response = self._c._send("GET", "/v1/keys", params=params, admin=True)
            out += [ApiKey.model_validate(k) for k in response.json()]
            cursor = response.headers.get("x-next-cursor")
            if not cursor:
                return out

    def revoke(self, key_id: str) -> None:
        self._c._send("DELETE", f"/v1/keys/{key_id}", admin=True)


class Webhooks:
    def __init__(self, client: Timbre) -> None:
        self._c = client

    def create(self, url: str, *, events: list[str], description: str | None = None) -> WebhookCreated:
        """Register an endpoint; the answer's `secret` (shown once) verifies its deliveries."""
        body = {"url": url, "events": events, **({"description": description} if description else {})}
        return WebhookCreated.model_validate(self._c._json("POST", "/v1/webhooks", json=body))

    def list(self) -> list[Webhook]:
        return [Webhook.model_validate(w) for w in self._c._json("GET", "/v1/webhooks")]

    def get(self, webhook_id: str) -> Webhook:
        return Webhook.model_validate(self._c._json("GET", f"/v1/webhooks/{webhook_id}"))

    def delete(self, webhook_id: str) -> None:
        self._c._send("DELETE", f"/v1/webhooks/{webhook_id}")

    def rotate(self, webhook_id: str, *, grace_s: float | None = None) -> WebhookCreated:
        """A new secret; the old one keeps signing beside it for `grace_s` seconds (the API's default: 24 h)."""
        body = {"grace_s": grace_s} if grace_s is not None else {}
        return WebhookCreated.model_validate(self._c._json("POST", f"/v1/webhooks/{webhook_id}/rotate", json=body))

    def deliveries(self, webhook_id: str, *, limit: int = 50) -> list[WebhookDelivery]:
        return [WebhookDelivery.model_validate(d)
                for d in self._c._json("GET", f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": limit})]

    @staticmethod
    def verify(payload: bytes | str, header: str, secret: str | list[str], *, tolerance_s: float = 300) -> WebhookEvent:
        """The event a delivery carries, once its Timbre-Signature matches; WebhookVerificationError otherwise."""
        return _webhooks.verify(payload, header, secret, tolerance_s=tolerance_s)
