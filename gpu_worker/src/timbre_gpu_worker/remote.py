"""The remote transport of the engine (Modal): job payloads in, one completion callback per job out.

Dependencies come in as arguments (`backend_for`, `fetch`, `post`), so the Modal app, the tests' fake
Modal and any other host run the same code. The payload is the dispatcher's work order
(`SynthesisRequested` as JSON) plus `callback_url` and `callback_secret`; the callback body is what the
gateway's `POST /v1/jobs/{id}/complete` accepts.
"""
from __future__ import annotations

import base64
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from timbre_common.logging import get_logger

from .backends.base import BackendError, SynthesisRequest

log = get_logger(__name__)

CALLBACK_ATTEMPTS = 6
CALLBACK_BACKOFF_S = 0.5
DEFAULT_BACKEND = "qwen3-1.7b"

# post(url, json_body, headers) -> HTTP status
PayloadPost = Callable[[str, dict[str, Any], dict[str, str]], int]


def post_with_retry(post: PayloadPost, url: str, body: dict[str, Any], secret: str, *,
                    attempts: int = CALLBACK_ATTEMPTS, backoff_s: float = CALLBACK_BACKOFF_S,
                    sleep: Callable[[float], None] = time.sleep) -> int | None:
    """POST the callback; retry 5xx and connection errors with exponential back-off; return the last status."""
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    status: int | None = None
    for attempt in range(attempts):
        try:
            status = post(url, body, headers)
        except Exception as exc:  # connection refused, reset, timeout: the gateway may be restarting
            log.warning("callback_post_failed", job_id=body.get("job_id"), error=type(exc).__name__,
                        attempt=attempt + 1)
            status = None
        else:
            # 2xx done; a 4xx will not get better (bad secret, unknown job): stop and let the deadline act.
            if status < 500:
                return status
            log.warning("callback_post_rejected", job_id=body.get("job_id"), status=status, attempt=attempt + 1)
        if attempt + 1 < attempts:
            sleep(backoff_s * (2**attempt))
    return status


def _reference_bytes(payload: Mapping[str, Any], fetch: Callable[[str], bytes]) -> bytes | None:
    if payload.get("ref_audio_b64"):
        return base64.b64decode(payload["ref_audio_b64"])
    url = payload.get("reference_url") or payload.get("ref_audio_url")
    return fetch(url) if url else None


def request_for(payload: Mapping[str, Any], reference: bytes | None) -> SynthesisRequest:
    """The backend's view of one payload."""
    return SynthesisRequest(job_id=str(payload["job_id"]), text=str(payload.get("text", "")),
                            lang=str(payload.get("lang", "en")), voice_id=str(payload.get("voice_id", "")),
                            reference_wav=reference, ref_text=payload.get("ref_text") or None,
                            system_voice=payload.get("system_voice") or None,
                            voice_profile=payload.get("voice_profile") or None)


def synthesize_payloads(payloads: Sequence[Mapping[str, Any]], backend_for: Callable[[str], Any],
                        fetch: Callable[[str], bytes], *, encode_wav: Callable[[Any, int], bytes] | None = None,
                        clock: Callable[[], float] = time.perf_counter,
                        on_body: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One callback body per payload, in order: the WAV (base64) and timings, or the error.

    `on_body(index, body)` is called once per payload as soon as that job is done (a backend that reports
    jobs one by one lets a finished job go before the rest of its batch).
    """
    if encode_wav is None:
        from timbre_common.audio import encode_wav

    bodies: list[dict[str, Any]] = []
    finished: set[int] = set()

    def finish(i: int) -> None:
        if i in finished:
            return
        finished.add(i)
        if on_body is not None:
            on_body(i, bodies[i])

    groups: dict[str, list[tuple[int, SynthesisRequest]]] = {}
    for i, p in enumerate(payloads):
        body: dict[str, Any] = {"job_id": p.get("job_id"), "voice_id": p.get("voice_id"),
                                "cache_key": p.get("cache_key"), "wav_b64": None, "error": None,
                                "error_code": None, "synthesis_ms": 0, "audio_seconds": 0.0, "rtf": None}
        bodies.append(body)
        try:
            reference = _reference_bytes(p, fetch)
        except Exception as exc:
            body.update(error=f"could not fetch the reference audio: {exc}", error_code="reference_unavailable")
            finish(i)
            continue
        groups.setdefault(str(p.get("backend") or DEFAULT_BACKEND), []).append((i, request_for(p, reference)))

    for name, items in groups.items():
        started = clock()

        def fill(k: int, result: Any, name: str = name, items: list = items, started: float = started) -> None:
            i, req = items[k]
            if i in finished:
                return
            elapsed_ms = int((clock() - started) * 1000)
            body = bodies[i]
            if isinstance(result, BackendError):
                body.update(error=result.reason, error_code=result.code, synthesis_ms=elapsed_ms)
                log.warning("synthesis_failed", job_id=req.job_id, backend=name, code=result.code,
                            reason=result.reason)
            else:
                seconds = float(result.audio_seconds)
                rtf = round(elapsed_ms / 1000 / seconds, 4) if seconds > 0 else None
                body.update(wav_b64=base64.b64encode(encode_wav(result.samples, result.sample_rate)).decode("ascii"),
                            synthesis_ms=elapsed_ms, audio_seconds=round(seconds, 3), rtf=rtf,
                            details=result.details)
                log.info("synthesis_completed", job_id=req.job_id, backend=name, synthesis_ms=elapsed_ms,
                         audio_seconds=round(seconds, 3), rtf=rtf, characters=len(req.text),
                         details=result.details)
            finish(i)

        requests = [req for _, req in items]
        try:
            backend = backend_for(name)
            if _accepts_on_result(backend):
                results = backend.synthesize_batch(requests, on_result=fill)
            else:
                results = backend.synthesize_batch(requests)
        except Exception as exc:  # backend missing or crashed: every job not yet delivered fails, none hang
            log.exception("remote_batch_failed", backend=name, batch_size=len(items))
            results = [BackendError("backend_unavailable", f"{name}: {exc}")] * len(items)
        for k, result in enumerate(results):
            fill(k, result)
        log.info("batch_synthesized", backend=name, batch_size=len(items),
                 wall_ms=int((clock() - started) * 1000))
    return bodies


def _accepts_on_result(backend: Any) -> bool:
    try:
        return "on_result" in inspect.signature(backend.synthesize_batch).parameters
    except (TypeError, ValueError):
        return False


def process_jobs(payloads: Sequence[Mapping[str, Any]], backend_for: Callable[[str], Any],
                 fetch: Callable[[str], bytes], post: PayloadPost, *,
                 encode_wav: Callable[[Any, int], bytes] | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> list[dict[str, Any]]:
    """Synthesize a batch of job payloads and POST one callback per job, each as soon as that job is done;
    returns the bodies sent.

    Every payload gets exactly one callback, with `error` set when anything about that job failed. A call
    killed mid-batch has already reported the jobs it finished; only the others are retried.
    """
    def send(i: int, body: dict[str, Any]) -> None:
        payload = payloads[i]
        status = post_with_retry(post, str(payload["callback_url"]), body, str(payload.get("callback_secret", "")),
                                 sleep=sleep)
        if status is None or status >= 300:
            log.error("callback_not_accepted", job_id=body["job_id"], status=status)

    return synthesize_payloads(payloads, backend_for, fetch, encode_wav=encode_wav, clock=clock, on_body=send)


def httpx_fetch(url: str) -> bytes:
    """GET a presigned URL."""
    import httpx

    resp = httpx.get(url, timeout=30.0, follow_redirects=True)
    resp.raise_for_status()
    return resp.content


def httpx_post(url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
    """POST JSON and return the status code."""
    import httpx

    return httpx.post(url, json=body, headers=headers, timeout=60.0).status_code
