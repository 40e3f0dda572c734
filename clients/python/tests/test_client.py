"""The SDK's own behaviour against a scripted transport: retries, idempotency keys, errors, streaming fallback."""
from __future__ import annotations

import json

import httpx
import pytest

from timbre import (
    AsyncTimbre,
    Audio,
    AuthenticationError,
    InvalidRequestError,
    Job,
    JobFailedError,
    NotFoundError,
    RateLimitError,
    ServerError,
    Timbre,
)
from timbre._base import RetryPolicy, parse_retry_after

FAST = RetryPolicy(max_retries=3, backoff_s=0.001, max_backoff_s=0.002)


def _error(status: int, code: str, message: str = "no", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}},
                          headers={"X-Request-Id": "req-1", **headers})


def _client(answers: list[httpx.Response], seen: list[httpx.Request]) -> Timbre:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    client = Timbre("tb_test_key_0123456789", base_url="http://timbre.test", transport=httpx.MockTransport(handler))
    client.retry = FAST
    return client


def test_429_is_retried_honouring_retry_after_and_synthesis_keeps_one_idempotency_key() -> None:
    seen: list[httpx.Request] = []
    client = _client([_error(429, "rate_limited", **{"Retry-After": "0"}), _error(503, "service_unavailable"),
                      httpx.Response(202, json={"job_id": "j1", "status": "pending"})], seen)
    job = client.speech.create("Hello", voice="joe")
    assert isinstance(job, Job) and job.job_id == "j1"
    keys = {r.headers.get("Idempotency-Key") for r in seen}
    assert len(seen) == 3 and len(keys) == 1 and None not in keys
    assert json.loads(seen[0].content) == {"voice_id": "joe", "text": "Hello", "response_format": "wav"}


def test_a_post_without_idempotency_is_not_retried_after_a_server_error() -> None:
    seen: list[httpx.Request] = []
    client = _client([_error(500, "internal_error")], seen)
    with pytest.raises(ServerError) as failed:
        client.uploads.create(b"RIFF....", purpose="voice_clone")
    assert len(seen) == 1 and failed.value.code == "internal_error" and failed.value.request_id == "req-1"


def test_connection_errors_are_retried_then_raised() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("refused")

    client = Timbre("tb_test_key_0123456789", base_url="http://timbre.test", transport=httpx.MockTransport(handler))
    client.retry = FAST
    from timbre import APIConnectionError

    with pytest.raises(APIConnectionError):
        client.jobs.get("j1")
    assert len(calls) == 4


def test_errors_carry_the_api_code_and_status() -> None:
    seen: list[httpx.Request] = []
    client = _client([_error(404, "voice_not_found"), _error(401, "invalid_api_key"), _error(422, "text_too_long"),
                      _error(429, "rate_limited"), _error(429, "rate_limited"), _error(429, "rate_limited"),
                      _error(429, "rate_limited")], seen)
    with pytest.raises(NotFoundError) as nf:
        client.voices.get("v")
    assert (nf.value.status, nf.value.code) == (404, "voice_not_found")
    with pytest.raises(AuthenticationError):
        client.usage.get()
    with pytest.raises(InvalidRequestError):
        client.speech.create("x" * 10, voice="joe")
    with pytest.raises(RateLimitError):
        client.usage.get()


def test_cache_hit_is_audio_and_wait_reports_progress_then_fails() -> None:
    seen: list[httpx.Request] = []
    client = _client([
        httpx.Response(200, content=b"RIFFwav", headers={"Content-Type": "audio/wav", "X-Cache": "HIT",
                                                          "X-Job-Id": "j0"}),
        httpx.Response(200, json={"job_id": "j1", "status": "pending"}),
        httpx.Response(200, json={"job_id": "j1", "status": "failed", "error_code": "synthesis_failed",
                                  "error": "boom"}),
    ], seen)
    audio = client.speech.create("Hello", voice="joe")
    assert isinstance(audio, Audio) and audio.content == b"RIFFwav" and audio.cache == "HIT" and audio.job_id == "j0"
    progress: list[str] = []
    with pytest.raises(JobFailedError) as failed:
        client.jobs.wait("j1", poll_interval=0.001, on_progress=lambda job, _: progress.append(job.status))
    assert progress == ["pending", "failed"] and failed.value.code == "synthesis_failed"


def test_stream_falls_back_to_the_job_when_the_api_does_not_stream() -> None:
    seen: list[httpx.Request] = []
    client = _client([
        _error(422, "invalid_request", "stream: Extra inputs are not permitted"),
        httpx.Response(202, json={"job_id": "j1", "status": "pending"}),
        httpx.Response(200, json={"job_id": "j1", "status": "ready"}),
        httpx.Response(200, content=b"A" * 40_000, headers={"Content-Type": "audio/wav"}),
    ], seen)
    pieces = list(client.speech.stream("Hello", voice="joe", chunk_size=16_384))
    assert [len(p) for p in pieces] == [16_384, 16_384, 7_232]
    assert json.loads(seen[0].content)["stream"] is True and "stream" not in json.loads(seen[1].content)


def test_stream_passes_a_streamed_answer_through() -> None:
    seen: list[httpx.Request] = []
    client = _client([httpx.Response(200, content=iter([b"RIFF", b"more", b"audio"]),
                                     headers={"Content-Type": "audio/wav"})], seen)
    assert b"".join(client.speech.stream("Hello", voice="joe")) == b"RIFFmoreaudio"


async def test_async_client_retries_and_pages() -> None:
    answers = [_error(503, "service_unavailable"),
               httpx.Response(200, json=[{"voice_id": "joe", "name": "joe", "backend": "embedded", "lang": "en",
                                          "kind": "system"}], headers={"X-Next-Cursor": "c1"}),
               httpx.Response(200, json=[{"voice_id": "v2", "name": "me", "backend": "embedded", "lang": "en",
                                          "kind": "custom"}])]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    async with AsyncTimbre("tb_test_key_0123456789", base_url="http://timbre.test",
                           transport=httpx.MockTransport(handler)) as client:
        client.retry = FAST
        voice = await client.voices.find("me")
    assert voice.voice_id == "v2" and seen[-1].url.params["cursor"] == "c1"


def test_retry_after_as_seconds_or_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after(None) is None


def test_key_and_url_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMBRE_API_KEY", "tb_from_env_0123456789")
    monkeypatch.setenv("TIMBRE_BASE_URL", "http://env.test/")
    client = Timbre()
    assert client.api_key == "tb_from_env_0123456789" and client.base_url == "http://env.test"
    monkeypatch.delenv("TIMBRE_API_KEY")
    with pytest.raises(AuthenticationError):
        Timbre().usage.get()
