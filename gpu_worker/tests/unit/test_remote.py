"""The remote (Modal) transport: one callback per payload, errors reported, 5xx retried, 4xx final."""
from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from timbre_common.audio import parse_wav
from timbre_common.testing import LoopbackServer
from timbre_gpu_worker.backends.base import BackendError, SynthesisRequest, SynthesisResult
from timbre_gpu_worker.remote import ReferenceTooLarge, httpx_fetch, post_with_retry, process_jobs


class EchoBackend:
    def __init__(self) -> None:
        self.seen: list[SynthesisRequest] = []

    def synthesize_batch(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult | BackendError]:
        self.seen.extend(requests)
        return [BackendError("empty_text", "nothing to synthesize") if not r.text else
                SynthesisResult(np.full(24000, 0.1, dtype=np.float32), 24000) for r in requests]


def _payload(job: str, **kw: Any) -> dict[str, Any]:
    return {"job_id": job, "voice_id": "v", "text": "Hi.", "lang": "en", "backend": "tone", "cache_key": "k",
            "callback_url": f"https://gw/v1/jobs/{job}/complete", "callback_token": "tok", **kw}


def test_every_payload_gets_one_callback_with_audio_or_error():
    backend, posts = EchoBackend(), []

    def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
        posts.append((url, body, headers))
        return 200

    def fetch(url: str) -> bytes:
        if "gone" in url:
            raise RuntimeError("404")
        return b"REF"

    payloads = [_payload("ok", reference_url="https://s/ref", ref_text="t", system_voice="joe"),
                _payload("empty", text=""), _payload("noref", reference_url="https://s/gone"),
                _payload("other", backend="missing")]

    def backend_for(name: str) -> Any:
        if name != "tone":
            raise RuntimeError("not in this image")
        return backend

    process_jobs(payloads, backend_for, fetch, post, clock=iter(range(0, 100, 1)).__next__, sleep=lambda s: None)
    bodies = {b["job_id"]: b for _, b, _ in posts}
    # Exactly one callback per job, each sent when that job is done (a failed fetch before any synthesis).
    assert sorted(u for u, _, _ in posts) == sorted(p["callback_url"] for p in payloads)
    assert posts[0][1]["job_id"] == "noref"
    assert all(h["Authorization"] == "Bearer tok" for _, _, h in posts)
    ok = bodies["ok"]
    assert ok["error"] is None and parse_wav(base64.b64decode(ok["wav_b64"])).duration_s == 1.0
    assert ok["audio_seconds"] == 1.0 and ok["synthesis_ms"] == 1000 and ok["rtf"] == 1.0
    assert backend.seen[0].reference_wav == b"REF" and backend.seen[0].system_voice == "joe"
    assert bodies["empty"]["error_code"] == "empty_text" and bodies["empty"]["wav_b64"] is None
    assert bodies["noref"]["error_code"] == "reference_unavailable"
    assert bodies["other"]["error_code"] == "backend_unavailable"


def test_callback_retries_5xx_and_connection_errors_and_stops_at_4xx():
    answers: list[Any] = [ConnectionError("down"), 503, 200]
    waits: list[float] = []

    def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert post_with_retry(post, "u", {"job_id": "j"}, "s", sleep=waits.append) == 200
    assert waits == [0.5, 1.0]
    answers[:] = [401, 200]
    assert post_with_retry(post, "u", {"job_id": "j"}, "s", sleep=waits.append) == 401
    assert answers == [200]


@pytest.fixture(scope="module")
def reference_server() -> Iterator[str]:
    """Serves /big (an endless-looking body without Content-Length), /sized (declared too big), /ok, /secret."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        if path == "/secret":
            await send({"type": "http.response.start", "status": 403, "headers": []})
            await send({"type": "http.response.body", "body": b"denied"})
            return
        if path == "/sized":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(10**9).encode())]})
            await send({"type": "http.response.body", "body": b"x" * 1024})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunks = 64 if path == "/big" else 1
        for i in range(chunks):
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": i + 1 < chunks})

    server = LoopbackServer(app).start()
    try:
        yield server.url
    finally:
        server.stop()


def test_the_remote_reference_fetch_is_capped(reference_server: str) -> None:
    assert len(httpx_fetch(f"{reference_server}/ok", max_bytes=100_000)) == 65536
    with pytest.raises(ReferenceTooLarge):
        httpx_fetch(f"{reference_server}/big", max_bytes=1_000_000)  # 4 MiB streamed, no length declared
    with pytest.raises(ReferenceTooLarge):
        httpx_fetch(f"{reference_server}/sized", max_bytes=1_000_000)


def test_a_failed_reference_fetch_reports_no_signature(reference_server: str) -> None:
    posts: list[dict[str, Any]] = []
    url = f"{reference_server}/secret?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeefcafe"
    process_jobs([_payload("j", reference_url=url)], lambda name: EchoBackend(), httpx_fetch,
                 lambda u, body, h: posts.append(body) or 200, sleep=lambda s: None)
    [body] = posts
    assert body["error_code"] == "reference_unavailable" and "403" in body["error"]
    assert "deadbeefcafe" not in body["error"] and "AKIAEXAMPLE" not in body["error"]
