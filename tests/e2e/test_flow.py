"""The whole path over HTTP: key, voice, synthesis, job, audio, cache hit; and a worker killed mid-job."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
import soundfile as sf

from timbre_common.audio import decode_wav, parse_wav
from timbre_common.catalogue import SYSTEM_VOICES

pytestmark = pytest.mark.e2e
HEART = next(v for v in SYSTEM_VOICES if v.name == "heart")
JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs away into the quiet forest."


def _speech_seconds(wav: bytes) -> float:
    info = parse_wav(wav)
    samples, _ = decode_wav(wav)
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 0.01, "audio is near silence"
    return info.duration_s


def test_health_lists_the_backends_that_run(client):
    r = client.http.get("/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert (body["status"], body["backends"], body["failing"]) == ("ok", ["embedded"], [])
    assert body["dependencies"] == dict.fromkeys(("database", "broker", "voices", "dispatcher", "storage", "billing"),
                                                 "ok")
    ready = client.http.get("/v1/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True,
                                                          "dependencies": {"database": "ok", "broker": "ok"}}


def test_keys_need_the_admin_secret(client):
    assert client.http.post("/v1/keys", json={}).status_code == 401
    r = client.http.post("/v1/keys", json={}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_secret"


def test_system_voices_are_listed_for_every_key(client):
    key = client.new_key()
    r = client.http.get("/v1/voices", headers=client.auth(key))
    assert r.status_code == 200
    names = {v["name"]: v for v in r.json()}
    assert {"joe", "heart"} <= names.keys()
    assert names["joe"]["backend"] == "embedded" and names["joe"]["kind"] == "system"


def test_system_voice_synthesis_then_cache_hit(client):
    key = client.new_key()
    body = {"voice_id": JOE.voice_id, "text": SENTENCE}
    r = client.http.post("/v1/synthesize", json=body, headers=client.auth(key))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending"
    assert (r.headers["X-Cache"], r.headers["X-Voice-Id"], r.headers["X-Backend"], r.headers["X-Synthesis-Time-Ms"]) \
        == ("MISS", JOE.voice_id, "embedded", "-1")
    job = client.wait_job(key, r.json()["job_id"])
    assert job["status"] == "ready", job
    assert job["audio_url"].startswith("http") and job["expires_at"]
    audio = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key))
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    assert audio.headers["X-Job-Id"] == job["job_id"]
    seconds = _speech_seconds(audio.content)
    assert 3.0 < seconds < 15.0, seconds
    # The presigned URL serves the same bytes without the API key.
    assert client.http.get(job["audio_url"]).content == audio.content
    again = client.http.post("/v1/synthesize", json=body, headers=client.auth(key))
    assert again.status_code == 200 and again.headers["content-type"] == "audio/wav"
    assert again.headers["X-Cache"] == "HIT" and again.headers["X-Backend"] == "embedded"
    assert int(again.headers["X-Synthesis-Time-Ms"]) >= 0
    assert again.content == audio.content


def test_custom_voice_cloned_and_spoken(client):
    """A reference recorded from the bundled 'heart' voice becomes a custom voice spoken by 'heart'."""
    key = client.new_key()
    r = client.http.post("/v1/synthesize", headers=client.auth(key), json={
        "voice_id": HEART.voice_id,
        "text": "This is my reference recording. I am reading a few sentences so that my voice can be "
                "cloned, and the service should find the bundled voice that sounds most like me."})
    ref_job = client.wait_job(key, r.json()["job_id"])
    reference = client.http.get(f"/v1/jobs/{ref_job['job_id']}/audio", headers=client.auth(key)).content
    assert parse_wav(reference).duration_s >= 5.0
    created = client.create_voice(key, reference, name="my voice", ref_text="This is my reference recording.")
    assert created.status_code == 201, created.text
    voice = created.json()
    assert voice["backend"] == "embedded" and voice["kind"] == "custom" and voice["name"] == "my voice"
    assert voice["quality"]["grade"] in ("good", "fair") and "api_key_hash" not in voice
    listed = client.http.get("/v1/voices", headers=client.auth(key)).json()
    assert voice["voice_id"] in {v["voice_id"] for v in listed}
    # The worker profiles the voice in the background: the nearest bundled voice is 'heart'.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        profile = client.http.get(f"/v1/voices/{voice['voice_id']}", headers=client.auth(key)).json()["profile"]
        if profile and profile.get("embedded"):
            break
        time.sleep(0.3)
    assert profile["embedded"]["voice"] == "heart", profile
    r = client.http.post("/v1/synthesize", json={"voice_id": voice["voice_id"], "text": SENTENCE},
                         headers=client.auth(key))
    assert r.status_code == 202
    job = client.wait_job(key, r.json()["job_id"])
    assert job["status"] == "ready", job
    audio = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key)).content
    assert 3.0 < _speech_seconds(audio) < 15.0


def test_response_formats_decode(client):
    key = client.new_key()
    for fmt, ctype in (("mp3", "audio/mpeg"), ("flac", "audio/flac"), ("opus", "audio/ogg")):
        body = {"voice_id": HEART.voice_id, "text": f"Format {fmt} check.", "response_format": fmt}
        r = client.http.post("/v1/synthesize", json=body, headers=client.auth(key))
        job = client.wait_job(key, r.json()["job_id"])
        audio = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key))
        assert audio.headers["content-type"].startswith(ctype)
        data, sr = sf.read(io.BytesIO(audio.content))
        assert len(data) / sr > 0.5
        hit = client.http.post("/v1/synthesize", json=body, headers=client.auth(key))
        assert hit.headers["X-Cache"] == "HIT" and hit.headers["content-type"].startswith(ctype)


def test_gpu_worker_killed_mid_job_still_reaches_ready(client):
    """SIGKILL the worker while it synthesizes; the broker redelivers; the restarted worker finishes once."""
    key = client.new_key()
    long_text = " ".join(f"Sentence number {i} of a long passage that keeps the worker busy for a while."
                         for i in range(40))
    log_before = client.platform.log("gpu_worker")
    r = client.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": long_text},
                         headers=client.auth(key))
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 30
    def started() -> bool:
        fresh = client.platform.log("gpu_worker")[len(log_before):]
        return any("synthesis_started" in line and job_id in line for line in fresh.splitlines())

    while not started() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started(), client.tail_logs()
    # Give it a moment inside synthesis, then kill it without any chance to ack.
    time.sleep(0.5)
    assert client.http.get(f"/v1/jobs/{job_id}", headers=client.auth(key)).json()["status"] == "pending"
    client.platform.kill("gpu_worker")
    client.platform.start("gpu_worker")
    job = client.wait_job(key, job_id, timeout=180)
    assert job["status"] == "ready", job
    audio = client.http.get(f"/v1/jobs/{job_id}/audio", headers=client.auth(key)).content
    assert _speech_seconds(audio) > 60
    # Done once: the job has one result and the cache answers the repeat.
    hit = client.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": long_text},
                           headers=client.auth(key))
    assert hit.headers["X-Cache"] == "HIT" and hit.content == audio
    # Billed once, whatever was redelivered.
    usage = client.http.get("/v1/usage", headers=client.auth(key)).json()
    assert usage["characters_used"] == len(long_text)


def test_logs_are_json_and_carry_the_correlation_id_through_every_service(client):
    """One request's id reaches the gateway, the dispatcher, the worker and storage, in structured lines."""
    import json
    import uuid

    key = client.new_key()
    cid = f"e2e-{uuid.uuid4().hex}"
    r = client.http.post("/v1/synthesize", headers={**client.auth(key), "X-Request-Id": cid},
                         json={"voice_id": HEART.voice_id, "text": f"Correlation check {cid[-6:]}."})
    assert r.status_code == 202 and r.headers["x-request-id"] == cid
    client.wait_job(key, r.json()["job_id"])

    def lines_with_id(service: str) -> list[dict]:
        found = []
        for line in client.platform.log(service).splitlines():
            if not line.startswith("{"):
                continue  # a library writing plain text to stderr, if any, is not ours to parse
            record = json.loads(line)
            assert record.get("service") == service and "event" in record and "timestamp" in record, record
            if record.get("correlation_id") == cid:
                found.append(record)
        return found

    deadline = time.monotonic() + 10
    services = ("gateway", "dispatcher", "gpu_worker")
    while time.monotonic() < deadline and not all(lines_with_id(s) for s in services):
        time.sleep(0.2)
    for service in services:
        assert lines_with_id(service), f"no log line of {service} carries the request's correlation id"
    assert any(r["event"] == "synthesis_completed" for r in lines_with_id("gpu_worker"))
