"""The asynchronous client: `AsyncTimbre(api_key=..., base_url=...)`, the same resources, awaited."""
from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import AsyncIterator, Callable
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

# A plain function or a coroutine function, called with (job, elapsed seconds) after every poll.
ProgressCallback = Callable[[Job, float], Any]
CHUNK_BYTES = 16 * 1024


class AsyncTimbre:
    """The asynchronous client; see `Timbre` for settings, retries and idempotency."""

    def __init__(self, api_key: str | None = None, *, base_url: str | None = None, admin_secret: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = 3,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.api_key, self.base_url = resolve_credentials(api_key, base_url)
        self.admin_secret = admin_secret or os.environ.get("TIMBRE_ADMIN_SECRET") or None
        self.retry = RetryPolicy(max_retries=max_retries)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport,
                                       headers={"User-Agent": USER_AGENT})
        self.voices = AsyncVoices(self)
        self.speech = AsyncSpeech(self)
        self.jobs = AsyncJobs(self)
        self.uploads = AsyncUploads(self)
        self.usage = AsyncUsage(self)
        self.account = AsyncAccount(self)
        self.keys = AsyncKeys(self)
        self.webhooks = AsyncWebhooks(self)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncTimbre:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def health(self) -> Health:
        return Health.model_validate(await self._json("GET", "/v1/health", auth=False))

    def _headers(self, *, admin: bool, auth: bool, idempotency_key: str | None) -> dict[str, str]:
        headers: dict[str, str] = {}
        token = (self.admin_secret or self.api_key) if admin else self.api_key
        if auth:
            if not token:
                raise AuthenticationError(401, "missing_api_key", "no API key: pass api_key= or set TIMBRE_API_KEY")
            headers["Authorization"] = f"Bearer {token}"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return headers

    async def _send(self, method: str, path: str, *, admin: bool = False, auth: bool = True,
                    idempotency_key: str | None = None, stream: bool = False, **kwargs: Any) -> httpx.Response:
        if method == "POST" and path in IDEMPOTENT_POSTS and idempotency_key is None:
            idempotency_key = new_idempotency_key()
        headers = self._headers(admin=admin, auth=auth, idempotency_key=idempotency_key)
        retry = 0
        while True:
            try:
                request = self._http.build_request(method, path, headers=headers, **kwargs)
                response = await self._http.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                if retry < self.retry.max_retries and retryable(method, path, headers, None):
                    retry += 1
                    await asyncio.sleep(self.retry.delay(retry, None))
                    continue
                raise APITimeoutError(f"{method} {path}: no answer in time ({exc})") from exc
            except httpx.TransportError as exc:
                if retry < self.retry.max_retries and retryable(method, path, headers, None):
                    retry += 1
                    await asyncio.sleep(self.retry.delay(retry, None))
                    continue
                raise APIConnectionError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            if response.status_code < 400:
                return response
            if stream:
                await response.aread()
                await response.aclose()
            body = json_body(response)
            again = retryable(method, path, headers, response.status_code) or is_retry_in_progress(response, body)
            if again and retry < self.retry.max_retries:
                retry += 1
                await asyncio.sleep(self.retry.delay(retry, parse_retry_after(response.headers.get("retry-after"))))
                continue
            raise_for_status(response, body)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._send(method, path, **kwargs)
        return json_body(response) if response.content else None


class AsyncVoices:
    def __init__(self, client: AsyncTimbre) -> None:
        self._c = client

    async def create(self, audio: str | Path | bytes | IO[bytes] | None = None, *, name: str, text: str | None = None,
                     backend: str | None = None, lang: str | None = None, family: str | None = None,
                     upload_id: str | None = None, idempotency_key: str | None = None) -> Voice:
        fields = {k: v for k, v in {"name": name, "ref_text": text, "backend": backend, "lang": lang,
                                    "family": family, "upload_id": upload_id}.items() if v is not None}
        files = None
        if audio is not None:
            filename, data = read_audio_source(audio)
            files = {"ref_audio": (filename, data, "audio/wav")}
        return Voice.model_validate(await self._c._json("POST", "/v1/voices", data=fields, files=files,
                                                        idempotency_key=idempotency_key))

    async def iter(self, *, page_size: int = 100) -> AsyncIterator[Voice]:
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size, **({"cursor": cursor} if cursor else {})}
            response = await self._c._send("GET", "/v1/voices", params=params)
            for v in response.json():
                yield Voice.model_validate(v)
            cursor = response.headers.get("x-next-cursor")
            if not cursor:
                return

    async def list(self, *, page_size: int = 100) -> list[Voice]:
        return [v async for v in self.iter(page_size=page_size)]

    async def get(self, voice_id: str) -> Voice:
        return Voice.model_validate(await self._c._json("GET", f"/v1/voices/{voice_id}"))

    async def find(self, name_or_id: str) -> Voice:
        return pick_voice(await self.list(), name_or_id)

    async def delete(self, voice_id: str) -> None:
        await self._c._send("DELETE", f"/v1/voices/{voice_id}")


class AsyncJobs:
    def __init__(self, client: AsyncTimbre) -> None:
        self._c = client

    async def get(self, job_id: str) -> Job:
        return Job.model_validate(await self._c._json("GET", f"/v1/jobs/{job_id}"))

    async def wait(self, job_id: str, *, timeout: float = 600.0, poll_interval: float = 0.25,
                   max_interval: float = 2.0, on_progress: ProgressCallback | None = None,
                   raise_on_failure: bool = True) -> Job:
        started = time.monotonic()
        interval = poll_interval
        while True:
            job = await self.get(job_id)
            elapsed = time.monotonic() - started
            if on_progress is not None:
                outcome = on_progress(job, elapsed)
                if inspect.isawaitable(outcome):
                    await outcome
            if job.status == "failed" and raise_on_failure:
                raise JobFailedError(job)
            if job.done:
                return job
            if elapsed + interval > timeout:
                raise WaitTimeoutError(job, timeout)
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, max_interval)

    async def audio(self, job_id: str) -> Audio:
        response = await self._c._send("GET", f"/v1/jobs/{job_id}/audio")
        return audio_from(response, response.content)


class AsyncSpeech:
    def __init__(self, client: AsyncTimbre) -> None:
        self._c = client

    async def create(self, text: str, *, voice: str, lang: str | None = None, backend: str | None = None,
                     response_format: str = "wav", webhook_url: str | None = None,
                     idempotency_key: str | None = None) -> Audio | Job:
        body = synthesis_body(voice, text, lang=lang, backend=backend, response_format=response_format,
                              webhook_url=webhook_url)
        response = await self._c._send("POST", "/v1/synthesize", json=body, idempotency_key=idempotency_key)
        if response.status_code == 202:
            return Job.model_validate(response.json())
        return audio_from(response, response.content)

    async def generate(self, text: str, *, voice: str, on_progress: ProgressCallback | None = None,
                       timeout: float = 600.0, **options: Any) -> Audio:
        result = await self.create(text, voice=voice, **options)
        if isinstance(result, Audio):
            return result
        await self._c.jobs.wait(result.job_id, on_progress=on_progress, timeout=timeout)
        return await self._c.jobs.audio(result.job_id)

    async def stream(self, text: str, *, voice: str, lang: str | None = None, backend: str | None = None,
                     response_format: str = "wav", chunk_size: int = CHUNK_BYTES,
                     on_progress: ProgressCallback | None = None, timeout: float = 600.0) -> AsyncIterator[bytes]:
        body = synthesis_body(voice, text, lang=lang, backend=backend, response_format=response_format,
                              webhook_url=None, stream=True)
        try:
            response = await self._c._send("POST", "/v1/synthesize", json=body, stream=True)
        except APIError as exc:
            if not stream_unsupported(exc):
                raise
            body.pop("stream")
            response = await self._c._send("POST", "/v1/synthesize", json=body, stream=True)
        try:
            if response.status_code == 202:
                await response.aread()
                job = Job.model_validate(response.json())
            else:
                async for piece in response.aiter_bytes(chunk_size):
                    yield piece
                return
        finally:
            await response.aclose()
        await self._c.jobs.wait(job.job_id, on_progress=on_progress, timeout=timeout)
        for piece in chunks((await self._c.jobs.audio(job.job_id)).content, chunk_size):
            yield piece


class AsyncUploads:
    def __init__(self, client: AsyncTimbre) -> None:
        self._c = client

    async def create(self, file: str | Path | bytes | IO[bytes], *, purpose: str | None = None,
                     content_type: str = "audio/wav") -> Upload:
        filename, data = read_audio_source(file)
        fields = {"purpose": purpose} if purpose else {}
        return Upload.model_validate(await self._c._json("POST", "/v1/uploads", data=fields,
                                                         files={"file": (filename, data, content_type)}))


class AsyncUsage:
    def __init__(self, client: AsyncTimbre) -> None:
        self._c = client

    async def get(self) -> Usage:
        return Usage.model_validate(await self._c._json("GET", "/v1/usage"))


class AsyncAccount:
    def __init__(self, client: AsyncTimbre) -> None:
        self._c = client

    async def delete(self) -> Purge:
        return Purge.model_validate(await self._c._json("DELETE", "/v1/account"))


class AsyncKeys:
    def __init__(self, client: AsyncTimbre) -> None:
        self._c = client

    async def create(self, *, label: str | None = None, account_id: str | None = None,
                     rate_per_minute: int | None = None, max_concurrent: int | None = None) -> ApiKeyCreated:
        body = {k: v for k, v in {"label": label, "account_id": account_id, "rate_per_minute": rate_per_minute,
                                  "max_concurrent": max_concurrent}.items() if v is not None}
        return ApiKeyCreated.model_validate(await self._c._json("POST", "/v1/keys", json=body, admin=True))

    async def list(self, *, account_id: str | None = None) -> list[ApiKey]:
        out: list[ApiKey] = []
        cursor: str | None = None
        while True:
            params = {k: v for k, v in {"account_id": account_id, "cursor": cursor, "limit": 500}.items() if v}
            response = await self._c._send("GET", "/v1/keys", params=params, admin=True)
            out += [ApiKey.model_validate(k) for k in response.json()]
            cursor = response.headers.get("x-next-cursor")
            if not cursor:
                return out

    async def revoke(self, key_id: str) -> None:
        await self._c._send("DELETE", f"/v1/keys/{key_id}", admin=True)


class AsyncWebhooks:
    def __init__(self, client: AsyncTimbre) -> None:
        self._c = client

    async def create(self, url: str, *, events: list[str], description: str | None = None) -> WebhookCreated:
        body = {"url": url, "events": events, **({"description": description} if description else {})}
        return WebhookCreated.model_validate(await self._c._json("POST", "/v1/webhooks", json=body))

    async def list(self) -> list[Webhook]:
        return [Webhook.model_validate(w) for w in await self._c._json("GET", "/v1/webhooks")]

    async def get(self, webhook_id: str) -> Webhook:
        return Webhook.model_validate(await self._c._json("GET", f"/v1/webhooks/{webhook_id}"))

    async def delete(self, webhook_id: str) -> None:
        await self._c._send("DELETE", f"/v1/webhooks/{webhook_id}")

    async def rotate(self, webhook_id: str, *, grace_s: float | None = None) -> WebhookCreated:
        body = {"grace_s": grace_s} if grace_s is not None else {}
        return WebhookCreated.model_validate(await self._c._json("POST", f"/v1/webhooks/{webhook_id}/rotate",
                                                                 json=body))

    async def deliveries(self, webhook_id: str, *, limit: int = 50) -> list[WebhookDelivery]:
        return [WebhookDelivery.model_validate(d) for d in
                await self._c._json("GET", f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": limit})]

    @staticmethod
    def verify(payload: bytes | str, header: str, secret: str | list[str], *, tolerance_s: float = 300) -> WebhookEvent:
        return _webhooks.verify(payload, header, secret, tolerance_s=tolerance_s)
