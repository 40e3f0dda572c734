"""The remote transport of the engine (Modal): job payloads in, one completion callback per job out.

Dependencies come in as arguments (`backend_for`, `fetch`, `post`), so the Modal app, the tests' fake
Modal and any other host run the same code. The payload is the dispatcher's work order
(`SynthesisRequested` as JSON) plus `callback_url` and `callback_token` (good for that job and attempt only:
the callback secret never reaches a remote host); the callback body is what the gateway's
`POST /v1/jobs/{id}/complete?attempt=N` accepts.

A streamed job's payload also has `chunk_url`: each piece of audio is POSTed there as it is made (chunk
callbacks, from a thread of their own so synthesis never waits on the network), authenticated with the same
token, and the gateway that receives it forwards it to the instance holding the client's connection. Chunk
callbacks rather than a Modal generator call: a generator needs a caller that holds the call open and relays
what it yields, i.e. the dispatcher would become a long-lived streaming proxy for every job; callbacks keep the
spawn-and-forget executor, the batching of `@modal.batched`, and the same authentication as the completion
callback.
"""
from __future__ import annotations

import base64
import inspect
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from timbre_common.logging import get_logger, scrub_urls

from .alignment import job_words
from .backends.base import BackendError, SynthesisRequest, SynthesisResult, pcm16

log = get_logger(__name__)

CALLBACK_ATTEMPTS = 6
CALLBACK_BACKOFF_S = 0.5
DEFAULT_BACKEND = "qwen3-1.7b"
# The most a reference download may bring (a 60 s float32 stereo 48 kHz WAV is 23 MB).
MAX_REFERENCE_BYTES = 25 * 1024 * 1024

# post(url, json_body, headers) -> HTTP status
PayloadPost = Callable[[str, dict[str, Any], dict[str, str]], int]


def post_with_retry(post: PayloadPost, url: str, body: dict[str, Any], token: str, *,
                    attempts: int = CALLBACK_ATTEMPTS, backoff_s: float = CALLBACK_BACKOFF_S,
                    sleep: Callable[[float], None] = time.sleep) -> int | None:
    """POST the callback; retry 5xx and connection errors with exponential back-off; return the last status."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    status: int | None = None
    for attempt in range(attempts):
        try:
            status = post(url, body, headers)
        except Exception as exc:  # connection refused, reset, timeout: the gateway may be restarting
            log.warning("callback_post_failed", job_id=body.get("job_id"), error=type(exc).__name__,
                        attempt=attempt + 1)
            status = None
        else:
            # 2xx done; a 4xx will not get better (bad token, unknown job): stop and let the deadline act.
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


def request_for(payload: Mapping[str, Any], reference: bytes | None, on_chunk: Any = None) -> SynthesisRequest:
    """The backend's view of one payload."""
    return SynthesisRequest(job_id=str(payload["job_id"]), text=str(payload.get("text", "")),
                            lang=str(payload.get("lang", "en")), voice_id=str(payload.get("voice_id", "")),
                            reference_wav=reference, ref_text=payload.get("ref_text") or None,
                            system_voice=payload.get("system_voice") or None,
                            voice_profile=payload.get("voice_profile") or None, on_chunk=on_chunk)


class ChunkPoster:
    """POSTs one streamed job's pieces to its `chunk_url`, in order, from a thread of its own.

    A piece that cannot be delivered is dropped after a short retry: the gateway sees the gap and ends its
    client's stream with an error, while the job itself still completes through the completion callback.
    """

    def __init__(self, post: PayloadPost, payload: Mapping[str, Any], *, attempts: int = 2) -> None:
        self.post, self.attempts = post, attempts
        # With word timestamps, the last piece waits for them.
        self.hold_final = bool(payload.get("timestamps"))
        self._held: dict[str, Any] | None = None
        self.url = str(payload["chunk_url"])
        self.secret = str(payload.get("callback_token", ""))
        self.base = {"job_id": payload.get("job_id"), "stream_to": payload.get("stream_to"),
                     "stream_id": payload.get("stream_id"), "attempt": int(payload.get("attempt") or 1)}
        self.next_seq = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"chunks-{self.base['job_id']}", daemon=True)
        self._thread.start()

    def __call__(self, samples: Any, sample_rate: int, index: int, total: int) -> None:
        """The backend's on_chunk."""
        piece = {"seq": index, "final": index + 1 >= total, "total": total, "sample_rate": sample_rate,
                 "pcm_b64": base64.b64encode(pcm16(samples)).decode("ascii")}
        self.next_seq = index + 1
        if self.hold_final and piece["final"]:
            self._held = piece
        else:
            self._queue.put(piece)

    def _run(self) -> None:
        while (piece := self._queue.get()) is not None:
            status = post_with_retry(self.post, self.url, {**self.base, **piece}, self.secret,
                                     attempts=self.attempts, backoff_s=0.1)
            if status is None or status >= 300:
                log.warning("stream_piece_unsent", job_id=self.base["job_id"], seq=piece["seq"], status=status)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(60)

    def finish(self, result: SynthesisResult, words: list[dict[str, Any]] | None = None) -> None:
        """After a good synthesis; a backend that could not stream sends its whole audio as the one piece."""
        if not result.streamed:
            self(result.samples, result.sample_rate, 0, 1)
        if self._held is not None:
            self._queue.put({**self._held, "words": words})
        self.close()

    def fail(self, code: str, reason: str) -> None:
        self._queue.put({"seq": self.next_seq, "final": True, "total": None, "sample_rate": 0, "pcm_b64": "",
                         "error_code": code, "error": reason})
        self.close()


def synthesize_payloads(payloads: Sequence[Mapping[str, Any]], backend_for: Callable[[str], Any],
                        fetch: Callable[[str], bytes], *, encode_wav: Callable[[Any, int], bytes] | None = None,
                        clock: Callable[[], float] = time.perf_counter,
                        post: PayloadPost | None = None, aligner: Any = None,
                        on_body: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One callback body per payload, in order: the WAV (base64) and timings, or the error. With `post`, the
    pieces of streamed payloads (those with a `chunk_url`) are posted as they are made.

    `on_body(index, body)` is called once per payload as soon as that job is done (a backend that reports
    jobs one by one lets a finished job go before the rest of its batch).
    """
    if encode_wav is None:
        from timbre_common.audio import encode_wav

    bodies: list[dict[str, Any]] = []
    posters: dict[int, ChunkPoster] = {}
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
        poster = ChunkPoster(post, p) if post is not None and p.get("chunk_url") and p.get("stream_id") else None
        try:
            reference = _reference_bytes(p, fetch)
        except Exception as exc:
            # An HTTP error's text quotes the presigned URL: its signature stays out of the job's error.
            body.update(error=scrub_urls(f"could not fetch the reference audio: {exc}"),
                        error_code="reference_unavailable")
            if poster is not None:
                poster.fail("reference_unavailable", "could not fetch the reference audio")
            finish(i)
            continue
        if poster is not None:
            posters[i] = poster
        groups.setdefault(str(p.get("backend") or DEFAULT_BACKEND), []).append((i, request_for(p, reference,
                                                                                               poster)))

    for name, items in groups.items():
        started = clock()

        def fill(k: int, result: Any, name: str = name, items: list = items, started: float = started) -> None:
            i, req = items[k]
            if i in finished:
                return
            elapsed_ms = int((clock() - started) * 1000)
            body = bodies[i]
            poster = posters.get(i)
            words = None
            if not isinstance(result, BackendError) and payloads[i].get("timestamps"):
                try:
                    words = job_words(req.lang, req.text, result.samples, result.sample_rate, result.words, aligner)
                except Exception as exc:  # the audio is good; the job goes on without timestamps
                    log.warning("word_alignment_failed", job_id=req.job_id, error=type(exc).__name__)
                if words is not None:
                    body["words"] = words
            if poster is not None and isinstance(result, BackendError):
                poster.fail(result.code, result.reason)
            elif poster is not None:
                poster.finish(result, words)
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
                 sleep: Callable[[float], None] = time.sleep, aligner: Any = None) -> list[dict[str, Any]]:
    """Synthesize a batch of job payloads and POST one callback per job, each as soon as that job is done;
    returns the bodies sent.

    Every payload gets exactly one callback, with `error` set when anything about that job failed. A call
    killed mid-batch has already reported the jobs it finished; only the others are retried.
    """
    def send(i: int, body: dict[str, Any]) -> None:
        payload = payloads[i]
        status = post_with_retry(post, str(payload["callback_url"]), body, str(payload.get("callback_token", "")),
                                 sleep=sleep)
        if status is None or status >= 300:
            log.error("callback_not_accepted", job_id=body["job_id"], status=status)

    return synthesize_payloads(payloads, backend_for, fetch, encode_wav=encode_wav, clock=clock, post=post,
                               aligner=aligner, on_body=send)


class ReferenceTooLarge(Exception):
    """The reference download passed the worker's size limit."""


def httpx_fetch(url: str, *, max_bytes: int = MAX_REFERENCE_BYTES) -> bytes:
    """GET a presigned URL, refusing more than `max_bytes` (read as it arrives, never held whole first)."""
    import httpx

    with httpx.stream("GET", url, timeout=30.0, follow_redirects=True) as resp:
        resp.raise_for_status()
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise ReferenceTooLarge(f"reference audio of {declared} bytes exceeds the limit of {max_bytes}")
        chunks, size = [], 0
        for chunk in resp.iter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise ReferenceTooLarge(f"reference audio exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def httpx_post(url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
    """POST JSON and return the status code."""
    import httpx

    return httpx.post(url, json=body, headers=headers, timeout=60.0).status_code
