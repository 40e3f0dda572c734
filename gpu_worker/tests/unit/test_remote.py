"""The remote (Modal) transport: one callback per payload, errors reported, 5xx retried, 4xx final."""
from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from timbre_common.audio import parse_wav
from timbre_gpu_worker.backends.base import BackendError, SynthesisRequest, SynthesisResult
from timbre_gpu_worker.remote import post_with_retry, process_jobs


class EchoBackend:
    def __init__(self) -> None:
        self.seen: list[SynthesisRequest] = []

    def synthesize_batch(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult | BackendError]:
        self.seen.extend(requests)
        return [BackendError("empty_text", "nothing to synthesize") if not r.text else
                SynthesisResult(np.full(24000, 0.1, dtype=np.float32), 24000) for r in requests]


def _payload(job: str, **kw: Any) -> dict[str, Any]:
    return {"job_id": job, "voice_id": "v", "text": "Hi.", "lang": "en", "backend": "tone", "cache_key": "k",
            "callback_url": f"https://gw/v1/jobs/{job}/complete", "callback_secret": "sec", **kw}


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
    assert all(h["Authorization"] == "Bearer sec" for _, _, h in posts)
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
