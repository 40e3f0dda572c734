"""Idempotency-Key, per-key rate and concurrency limits shared by gateway replicas, kept per replica with Redis
down."""
from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest

from timbre_common.catalogue import SYSTEM_VOICES
from timbre_gateway.http.idempotency import fingerprint
from timbre_gateway.http.schemas import SynthesizeRequest

pytestmark = pytest.mark.e2e
JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gateway_replica(client, tmp_path: Path, **env: str) -> Iterator[httpx.Client]:
    """Another gateway process on the same database, bus and Redis as the platform's, on its own port."""
    port = _free_port()
    log_path = tmp_path / f"gateway-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "timbre_gateway"],
                                env={**os.environ, **client.env, "PORT": str(port), **env},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    http.log_path = log_path  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if http.get("/v1/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield http
    finally:
        http.close()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def voice_form(client, key, wav: bytes, name: str, idem: str | None = None, http=None) -> httpx.Response:
    headers = {**client.auth(key), **({"Idempotency-Key": idem} if idem else {})}
    return (http or client.http).post("/v1/voices", headers=headers, data={"name": name},
                                      files={"ref_audio": ("ref.wav", io.BytesIO(wav), "audio/wav")})


def custom_voices(client, key) -> list[dict]:
    return [v for v in client.http.get("/v1/voices", headers=client.auth(key)).json() if v["kind"] == "custom"]


def references(client, account_id: str) -> list[Path]:
    root = Path(client.env["STORAGE_ROOT"]) / "voices"
    return [p for p in root.rglob("*.wav") if account_id in p.parts]


# Idempotency --------------------------------------------------------------------------------------------
def test_retried_voice_creation_returns_the_first_answer(client, wavs):
    key = client.new_key(label="idem-voice")
    wav, idem = wavs.valid_wav(6.0), f"voice-{uuid.uuid4()}"
    first = voice_form(client, key, wav, "once", idem)
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    again = voice_form(client, key, wav, "once", idem)  # a new multipart boundary: the same request
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json() and again.headers["content-type"] == "application/json"
    assert [v["voice_id"] for v in custom_voices(client, key)] == [first.json()["voice_id"]]
    assert len(references(client, key["account_id"])) == 1
    reused = voice_form(client, key, wav, "another name", idem)
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
    other_audio = voice_form(client, key, wavs.valid_wav(7.0), "once", idem)
    assert other_audio.status_code == 422 and other_audio.json()["error"]["code"] == "idempotency_key_reused"
    assert len(custom_voices(client, key)) == 1
    # Without the header every request creates.
    assert voice_form(client, key, wav, "once").status_code == 201
    assert len(custom_voices(client, key)) == 2


def test_retried_synthesis_returns_the_same_job(client):
    key = client.new_key(label="idem-synth")
    idem = {"Idempotency-Key": f"synth-{uuid.uuid4()}"}
    body = {"voice_id": JOE.voice_id, "text": f"Idempotent synthesis {uuid.uuid4().hex[:6]}."}
    first = client.http.post("/v1/synthesize", json=body, headers={**client.auth(key), **idem})
    assert first.status_code == 202, first.text
    again = client.http.post("/v1/synthesize", json=body, headers={**client.auth(key), **idem})
    assert again.status_code == 202 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    for header in ("X-Cache", "X-Voice-Id", "X-Backend", "X-Synthesis-Time-Ms", "Location"):
        assert again.headers[header] == first.headers[header]
    job = client.wait_job(key, first.json()["job_id"])
    assert job["status"] == "ready"
    # Even after the job finished (a fresh request would now be a cache HIT) the retry still gets the 202.
    late = client.http.post("/v1/synthesize", json=body, headers={**client.auth(key), **idem})
    assert late.status_code == 202 and late.json()["job_id"] == first.json()["job_id"]
    fresh = client.http.post("/v1/synthesize", json=body, headers=client.auth(key))
    assert fresh.status_code == 200 and fresh.headers["X-Cache"] == "HIT"
    changed = client.http.post("/v1/synthesize", json={**body, "response_format": "mp3"},
                               headers={**client.auth(key), **idem})
    assert changed.status_code == 422 and changed.json()["error"]["code"] == "idempotency_key_reused"


def test_errors_are_not_stored_and_bad_keys_are_refused(client):
    key = client.new_key(label="idem-errors")
    idem = {"Idempotency-Key": f"err-{uuid.uuid4()}"}
    body = {"voice_id": str(uuid.uuid4()), "text": "Nobody speaks."}
    for _ in range(2):
        r = client.http.post("/v1/synthesize", json=body, headers={**client.auth(key), **idem})
        assert r.status_code == 404 and "Idempotent-Replayed" not in r.headers
    # The key was freed by the failure, so it can serve another request.
    ok = client.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": "Somebody speaks."},
                          headers={**client.auth(key), **idem})
    assert ok.status_code in (200, 202), ok.text
    for bad in ("x" * 256, "tab\there"):
        r = client.http.post("/v1/synthesize", json=body, headers={**client.auth(key), "Idempotency-Key": bad})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"


def test_same_key_while_the_first_is_in_flight_is_409(client):
    """A first attempt still running (on any replica) holds the key: a retry is told to wait."""
    key = client.new_key(label="idem-inflight")
    body = {"voice_id": JOE.voice_id, "text": "In flight."}
    idem = f"inflight-{uuid.uuid4()}"
    digest = fingerprint("POST /v1/synthesize", SynthesizeRequest.model_validate(body).model_dump())

    async def claim() -> None:
        conn = await asyncpg.connect(client.env["DATABASE_URL"], server_settings={"search_path": "gateway"})
        await conn.execute("INSERT INTO idempotency_keys (account_id, idem_key, fingerprint, locked_until, "
                           "expires_at) VALUES ($1, $2, $3, now() + interval '1 hour', now() + interval '1 day')",
                           key["account_id"], idem, digest)
        await conn.close()

    asyncio.run(claim())
    r = client.http.post("/v1/synthesize", json=body, headers={**client.auth(key), "Idempotency-Key": idem})
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_in_progress"
    assert int(r.headers["Retry-After"]) >= 1


def test_concurrent_retries_create_one_voice(client, wavs):
    key = client.new_key(label="idem-race", max_concurrent=20)
    wav, idem = wavs.valid_wav(6.0), f"race-{uuid.uuid4()}"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: voice_form(client, key, wav, "raced", idem), range(6)))
    assert {r.status_code for r in answers} <= {201, 409}, [r.text for r in answers]
    created = {r.json()["voice_id"] for r in answers if r.status_code == 201}
    assert len(created) == 1
    assert [v["voice_id"] for v in custom_voices(client, key)] == list(created)
    assert len(references(client, key["account_id"])) == 1


# Rate and concurrency limits ----------------------------------------------------------------------------
def test_rate_limit_per_key_with_retry_after(client):
    small, other = client.new_key(label="rate-3", rate_per_minute=3), client.new_key(label="rate-default")
    answers = [client.http.get("/v1/voices", headers=client.auth(small)) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in answers[:3]] == ["2", "1", "0"]
    refused = answers[3]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 20 and refused.headers["X-RateLimit-Limit"] == "3"
    # Every authenticated route counts, and other keys are untouched.
    assert client.http.get(f"/v1/jobs/{uuid.uuid4()}", headers=client.auth(small)).status_code == 429
    assert client.http.get("/v1/voices", headers=client.auth(other)).status_code == 200
    assert client.http.get("/v1/voices", headers=client.auth(other)).headers["X-RateLimit-Limit"] == "120"


def test_admin_changes_a_keys_limits(client):
    key = client.new_key(label="patched", rate_per_minute=1)
    assert client.http.get("/v1/voices", headers=client.auth(key)).status_code == 200
    assert client.http.get("/v1/voices", headers=client.auth(key)).status_code == 429
    patched = client.http.patch(f"/v1/keys/{key['key_id']}", json={"rate_per_minute": 600, "max_concurrent": 3},
                                headers=client.admin())
    assert patched.status_code == 200, patched.text
    assert (patched.json()["rate_per_minute"], patched.json()["max_concurrent"]) == (600, 3)
    allowed = client.http.get("/v1/voices", headers=client.auth(key))
    assert allowed.status_code == 200 and allowed.headers["X-RateLimit-Limit"] == "600"
    # null puts the deployment default back; a field left out is left alone.
    reset = client.http.patch(f"/v1/keys/{key['key_id']}", json={"rate_per_minute": None}, headers=client.admin())
    assert (reset.json()["rate_per_minute"], reset.json()["max_concurrent"]) == (None, 3)
    assert client.http.get("/v1/voices", headers=client.auth(key)).headers["X-RateLimit-Limit"] == "120"
    for body, status in (({"rate_per_minute": 0}, 422), ({"burst": 5}, 422), ({"max_concurrent": "many"}, 422)):
        r = client.http.patch(f"/v1/keys/{key['key_id']}", json=body, headers=client.admin())
        assert r.status_code == status and set(r.json()) == {"error"}, r.text
    assert client.http.patch(f"/v1/keys/{key['key_id']}", json={"rate_per_minute": 5}).status_code == 401
    assert client.http.patch(f"/v1/keys/{uuid.uuid4()}", json={}, headers=client.admin()).status_code == 404
    assert client.http.patch("/v1/keys/nope", json={}, headers=client.admin()).status_code == 404


@pytest.fixture(scope="module")
def replica(client, tmp_path_factory) -> Iterator[httpx.Client]:
    """A second gateway replica beside the platform's."""
    with gateway_replica(client, tmp_path_factory.mktemp("replica")) as http:
        yield http


def test_rate_limit_is_shared_by_replicas(client, replica):
    key = client.new_key(label="rate-shared", rate_per_minute=6)
    statuses = [(client.http if i % 2 else replica).get("/v1/voices", headers=client.auth(key)).status_code
                for i in range(10)]
    assert statuses.count(200) == 6 and statuses.count(429) == 4 and statuses[:6] == [200] * 6


def test_concurrency_limit_is_shared_by_replicas(client, replica, wavs):
    """One slow upload in flight on one replica holds the key's only slot; the other replica refuses more."""
    key = client.new_key(label="conc-1", max_concurrent=1, rate_per_minute=100_000)
    boundary = "slowboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nslow\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"ref_audio\"; filename=\"r.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode()
    release = threading.Event()

    def body() -> Iterator[bytes]:
        yield head
        release.wait(30)
        yield wavs.valid_wav(6.0) + f"\r\n--{boundary}--\r\n".encode()

    result: dict[str, httpx.Response | BaseException] = {}

    def slow() -> None:
        # A connection of its own: a pooled one that an earlier test's answer closed cannot be retried with a
        # streamed body, and would end this request before it holds the slot.
        try:
            with httpx.Client(base_url=client.base_url, timeout=60) as own:
                result["slow"] = own.post("/v1/voices", content=body(), headers={
                    **client.auth(key), "content-type": f"multipart/form-data; boundary={boundary}"})
        except BaseException as exc:  # reported below, not lost in the thread
            result["slow"] = exc

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while True:
            r = replica.get("/v1/voices", headers=client.auth(key))
            if r.status_code == 429 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 429, (r.text, result.get("slow"))
        assert r.json()["error"]["code"] == "too_many_concurrent_requests" and r.headers["Retry-After"] == "1"
    finally:
        release.set()
        thread.join(30)
    slow_answer = result["slow"]
    assert isinstance(slow_answer, httpx.Response), slow_answer
    assert slow_answer.status_code == 201, slow_answer.text
    # The slot was given back with the answer.
    assert replica.get("/v1/voices", headers=client.auth(key)).status_code == 200
    assert client.http.get("/v1/voices", headers=client.auth(key)).status_code == 200


def test_redis_down_still_limits_per_replica(client, tmp_path):
    """A replica whose Redis is unreachable keeps serving and keeps the key's limit on its own (before: every
    request passed), and says so in its log."""
    key = client.new_key(label="redis-down", rate_per_minute=1)
    with gateway_replica(client, tmp_path, REDIS_URL="redis://127.0.0.1:1/0") as down:
        started = time.monotonic()
        statuses = [down.get("/v1/voices", headers=client.auth(key)).status_code for _ in range(5)]
        elapsed = time.monotonic() - started
        log = Path(down.log_path).read_text()  # type: ignore[attr-defined]
    assert statuses == [200] + [429] * 4, statuses
    assert elapsed < 5.0, elapsed
    assert "rate_limiter_degraded_to_local" in log
