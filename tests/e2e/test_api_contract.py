"""The HTTP contract of seeds/002 over HTTP: validation codes, error body, headers, formats, quality, cascade."""
from __future__ import annotations

import hashlib
import io
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.e2e.conftest import send_chunked
from timbre_common.audio import parse_wav
from timbre_common.callback_tokens import callback_token
from timbre_common.catalogue import SYSTEM_VOICES

pytestmark = pytest.mark.e2e
JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")
HEART = next(v for v in SYSTEM_VOICES if v.name == "heart")


def assert_error(r, status: int, code: str | None = None) -> dict:
    """The one error body: {"error": {"code", "message"[, "details"]}}, JSON, with the expected status."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    assert {"code", "message"} <= set(body["error"]) <= {"code", "message", "details"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"].isidentifier()
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def blobs(client, account_id: str) -> list[Path]:
    """Every object the fs storage holds for an account."""
    root = Path(client.env["STORAGE_ROOT"])
    return [p for p in root.rglob("*") if p.is_file() and account_id in p.parts]


def upload(client, key, wav: bytes | None, *, content_type: str = "audio/wav", **fields: str):
    files = {"ref_audio": ("ref.wav", io.BytesIO(wav), content_type)} if wav is not None else None
    return client.http.post("/v1/voices", headers=client.auth(key), data=fields, files=files)


@pytest.fixture(scope="module")
def key(client) -> dict:
    return client.new_key(label="contract", rate_per_minute=100_000, max_concurrent=50)


@pytest.fixture(scope="module")
def voice(client, key, wavs) -> dict:
    r = client.create_voice(key, wavs.valid_wav(6.0), name="contract voice")
    assert r.status_code == 201, r.text
    return r.json()


# Health and keys ----------------------------------------------------------------------------------------
def test_health_needs_no_auth(client):
    r = client.http.get("/v1/health")
    assert r.status_code == 200
    assert {k: r.json()[k] for k in ("status", "backends", "failing")} == \
        {"status": "ok", "backends": ["embedded"], "failing": []}
    assert client.http.get("/v1/ready").status_code == 200


def test_keys_create_list_revoke_and_never_show_a_hash(client, wavs):
    assert_error(client.http.post("/v1/keys", json={}), 401, "invalid_admin_secret")
    assert_error(client.http.post("/v1/keys", json={}, headers={"Authorization": "Bearer tb_" + "x" * 40}), 401,
                 "invalid_admin_secret")
    created = client.new_key(label="my-app")
    assert created["api_key"].startswith("tb_") and created["label"] == "my-app" and created["created_at"]
    digest = hashlib.sha256(created["api_key"].encode()).hexdigest()
    listed = client.http.get("/v1/keys", headers=client.admin())
    assert listed.status_code == 200
    assert created["key_id"] in {k["key_id"] for k in listed.json()}
    assert digest not in listed.text and created["api_key"] not in listed.text
    assert all("key_hash" not in k and "api_key" not in k for k in listed.json())
    voice = client.create_voice(created, wavs.valid_wav(5.5)).json()
    got = client.http.get(f"/v1/voices/{voice['voice_id']}", headers=client.auth(created))
    assert digest not in got.text and "hash" not in got.text and "reference_key" not in got.json()
    assert_error(client.http.delete(f"/v1/keys/{created['key_id']}"), 401)
    assert client.http.delete(f"/v1/keys/{created['key_id']}", headers=client.admin()).status_code == 204
    assert_error(client.http.get("/v1/voices", headers=client.auth(created)), 401, "invalid_api_key")
    assert_error(client.http.delete(f"/v1/keys/{uuid.uuid4()}", headers=client.admin()), 404, "key_not_found")
    assert_error(client.http.delete("/v1/keys/not-a-uuid", headers=client.admin()), 404, "key_not_found")
    assert_error(client.http.post("/v1/keys", json={"label": 5}, headers=client.admin()), 422)
    assert_error(client.http.post("/v1/keys", content=b"{", headers={**client.admin(),
                                                                    "content-type": "application/json"}), 400)


def test_user_routes_need_a_key(client):
    for method, path in (("GET", "/v1/voices"), ("POST", "/v1/synthesize"), ("GET", f"/v1/jobs/{uuid.uuid4()}"),
                         ("GET", f"/v1/voices/{uuid.uuid4()}"), ("DELETE", f"/v1/voices/{uuid.uuid4()}")):
        assert_error(client.http.request(method, path), 401, "missing_api_key")
        r = client.http.request(method, path, headers={"Authorization": "Bearer tb_" + "n" * 43})
        assert_error(r, 401, "invalid_api_key")


# Voices -------------------------------------------------------------------------------------------------
def test_voice_validation_matrix(client, wavs):
    key = client.new_key(label="voice-matrix", rate_per_minute=100_000)
    good = wavs.valid_wav(6.0)
    cases = [
        (upload(client, key, good), 400, "missing_field"),                      # no name
        (upload(client, key, None, name="x"), 400, "missing_field"),            # no ref_audio
        (upload(client, key, b"", name="x"), 400, "missing_field"),             # empty ref_audio
        (upload(client, key, good, content_type="audio/mpeg", name="x"), 422, "not_wav"),
        (upload(client, key, b"ID3\x04" + b"\xff\xfb" * 500, name="x"), 422, "not_wav"),
        (upload(client, key, wavs.valid_wav(4.9), name="x"), 422, "duration_out_of_range"),
        (upload(client, key, wavs.valid_wav(60.5), name="x"), 422, "duration_out_of_range"),
        (upload(client, key, good, name="x", backend="qwen9"), 422, "invalid_backend"),
        (upload(client, key, good, name="x", lang="xx"), 422, "unsupported_language"),
        # A language the system knows but this deployment's backend does not speak: refused at the door.
        (upload(client, key, good, name="x", lang="zh"), 422, "unsupported_language"),
        (client.http.post("/v1/voices", headers=client.auth(key), json={"name": "x"}), 422,
         "unsupported_media_type"),
    ]
    for r, status, code in cases:
        assert_error(r, status, code)
    assert_error(upload(client, key, wavs.valid_wav(6.0), name="x", backend="qwen3-1.7b"), 422,
                 "backend_unavailable")
    listed = client.http.get("/v1/voices", headers=client.auth(key)).json()
    assert [v for v in listed if v["kind"] == "custom"] == []
    assert blobs(client, key["account_id"]) == []


def test_file_over_20mb_is_refused(client, wavs):
    key = client.new_key(label="big")
    big = wavs.valid_wav(5.0) + b"\x00" * (20 * 1024 * 1024)
    assert_error(upload(client, key, big, name="big"), 422, "file_too_large")
    assert blobs(client, key["account_id"]) == []


@pytest.mark.parametrize(("sample_rate", "channels", "bits", "fmt"), [
    (24000, 1, 16, "pcm"), (44100, 2, 16, "pcm"), (48000, 1, 24, "pcm"), (16000, 2, 32, "pcm"),
    (22050, 1, 32, "float"), (32000, 2, 32, "float"), (8000, 1, 16, "pcm"), (96000, 1, 24, "pcm"),
])
def test_common_wav_flavours_are_accepted_and_normalised(client, key, wavs, sample_rate, channels, bits, fmt):
    r = client.create_voice(key, wavs.valid_wav(5.5, sample_rate, channels, bits, fmt), name=f"{sample_rate}")
    assert r.status_code == 201, r.text
    voice = r.json()
    quality = voice["quality"]
    assert quality["sample_rate"] == sample_rate and quality["channels"] == channels
    assert voice["metadata"]["original"]["bits"] == bits
    # What the models read is the normalised reference: mono PCM at the model rate.
    stored = [p for p in blobs(client, key["account_id"]) if p.name == f"{voice['voice_id']}.wav"]
    assert len(stored) == 1
    info = parse_wav(stored[0].read_bytes())
    assert info.channels == 1 and info.format == "pcm" and info.sample_rate == 24000
    assert abs(info.duration_s - 5.5) < 0.05


def test_quality_report_in_the_voice_record(client, key, wavs):
    good = client.create_voice(key, wavs.valid_wav(8.0), name="clean").json()
    report = good["quality"]
    assert {"duration_s", "rms_dbfs", "peak_dbfs", "clipping_ratio", "silence_ratio", "snr_db", "grade",
            "issues"} <= set(report)
    assert report["grade"] == "good" and abs(report["duration_s"] - 8.0) < 0.01 and report["issues"] == []
    corpus = {h.name: h for h in wavs.hostile_wavs() if h.expected_code is None}
    clipped = client.create_voice(key, corpus["clipped_10s"].data, name="clipped").json()["quality"]
    assert clipped["grade"] == "poor" and "clipping" in clipped["issues"] and clipped["clipping_ratio"] > 0.01
    silent = client.create_voice(key, corpus["silence_10s"].data, name="silent").json()["quality"]
    assert silent["grade"] == "poor" and silent["silence_ratio"] > 0.9 and "mostly_silence" in silent["issues"]
    # The report is kept: GET returns it again.
    again = client.http.get(f"/v1/voices/{good['voice_id']}", headers=client.auth(key)).json()
    assert again["quality"] == report


def test_voice_list_and_record(client, key, voice):
    listed = client.http.get("/v1/voices", headers=client.auth(key))
    assert listed.status_code == 200
    mine = next(v for v in listed.json() if v["voice_id"] == voice["voice_id"])
    assert set(mine) == {"voice_id", "name", "backend", "lang", "kind", "created_at"}
    assert mine["name"] == "contract voice" and mine["backend"] == "embedded" and mine["lang"] == "en"
    got = client.http.get(f"/v1/voices/{voice['voice_id']}", headers=client.auth(key))
    assert got.status_code == 200 and got.json()["voice_id"] == voice["voice_id"]
    assert not {"api_key_hash", "key_hash", "account_id", "reference_key"} & set(got.json())
    # System voices are everyone's: visible, never deletable (403, the one case that is not a 404).
    assert_error(client.http.delete(f"/v1/voices/{JOE.voice_id}", headers=client.auth(key)), 403,
                 "system_voice_readonly")
    for unknown in (str(uuid.uuid4()), "not-a-uuid", "x" * 300):
        assert_error(client.http.get(f"/v1/voices/{unknown}", headers=client.auth(key)), 404, "voice_not_found")
        assert_error(client.http.delete(f"/v1/voices/{unknown}", headers=client.auth(key)), 404, "voice_not_found")
    # A hostile id is not echoed back whole.
    huge = client.http.get(f"/v1/voices/{'y' * 5000}", headers=client.auth(key))
    assert huge.status_code == 404 and len(huge.json()["error"]["message"]) <= 500


# Synthesis ----------------------------------------------------------------------------------------------
def test_synthesize_validation_matrix(client, key, voice):
    vid = voice["voice_id"]
    cases = [
        ({"text": "hi"}, 400, "missing_field"),
        ({"voice_id": vid}, 400, "missing_field"),
        ({"voice_id": vid, "text": "   "}, 400, "missing_field"),
        ({"voice_id": vid, "text": "x" * 5001}, 422, "text_too_long"),
        ({"voice_id": vid, "text": "hi", "backend": "nope"}, 422, "invalid_backend"),
        ({"voice_id": vid, "text": "hi", "lang": "xx"}, 422, "unsupported_language"),
        ({"voice_id": vid, "text": "hi", "lang": "ja"}, 422, "unsupported_language"),
        ({"voice_id": vid, "text": "hi", "backend": "qwen3-0.6b"}, 422, "backend_unavailable"),
        ({"voice_id": vid, "text": "hi", "response_format": "aiff"}, 422, "invalid_request"),
        ({"voice_id": vid, "text": 7}, 422, "invalid_request"),
        ({"voice_id": str(uuid.uuid4()), "text": "hi"}, 404, "voice_not_found"),
        ({"voice_id": "not-a-uuid", "text": "hi"}, 404, "voice_not_found"),
    ]
    for body, status, code in cases:
        assert_error(client.http.post("/v1/synthesize", json=body, headers=client.auth(key)), status, code)
    assert_error(client.http.post("/v1/synthesize", content=b"{nope", headers={
        **client.auth(key), "content-type": "application/json"}), 400, "invalid_json")
    assert_error(client.http.post("/v1/synthesize", json=[1, 2], headers=client.auth(key)), 400, "invalid_body")


def test_miss_then_hit_headers_and_the_job(client, key, voice):
    body = {"voice_id": voice["voice_id"], "text": "Headers are part of the contract."}
    miss = client.http.post("/v1/synthesize", json=body, headers=client.auth(key))
    assert miss.status_code == 202, miss.text
    assert miss.json() == {"job_id": miss.json()["job_id"], "status": "pending"}
    assert (miss.headers["X-Cache"], miss.headers["X-Voice-Id"], miss.headers["X-Backend"],
            miss.headers["X-Synthesis-Time-Ms"]) == ("MISS", voice["voice_id"], "embedded", "-1")
    job_id = miss.json()["job_id"]
    pending = client.http.get(f"/v1/jobs/{job_id}", headers=client.auth(key)).json()
    if pending["status"] == "pending":
        assert "audio_url" not in pending and "expires_at" not in pending and "error" not in pending
    job = client.wait_job(key, job_id)
    assert job["status"] == "ready" and job["audio_url"].startswith("http") and job["expires_at"]
    assert "error" not in job
    audio = client.http.get(f"/v1/jobs/{job_id}/audio", headers=client.auth(key))
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    assert audio.headers["X-Job-Id"] == job_id
    hit = client.http.post("/v1/synthesize", json=body, headers=client.auth(key))
    assert hit.status_code == 200 and hit.headers["content-type"] == "audio/wav"
    assert (hit.headers["X-Cache"], hit.headers["X-Voice-Id"], hit.headers["X-Backend"]) == \
        ("HIT", voice["voice_id"], "embedded")
    assert int(hit.headers["X-Synthesis-Time-Ms"]) >= 0
    assert hit.content == audio.content
    assert int(hit.headers["X-RateLimit-Limit"]) == 100_000


def test_every_response_format_decodes(client, key):
    expected = {"wav": "audio/wav", "mp3": "audio/mpeg", "opus": "audio/ogg", "flac": "audio/flac",
                "pcm": "audio/pcm"}
    for fmt, ctype in expected.items():
        body = {"voice_id": JOE.voice_id, "text": f"The {fmt} format decodes.", "response_format": fmt}
        r = client.http.post("/v1/synthesize", json=body, headers=client.auth(key))
        assert r.status_code == 202, r.text
        job = client.wait_job(key, r.json()["job_id"])
        assert job["status"] == "ready" and job["response_format"] == fmt
        audio = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key))
        assert audio.status_code == 200 and audio.headers["content-type"].startswith(ctype), audio.headers
        if fmt == "pcm":
            params = dict(p.strip().split("=") for p in audio.headers["content-type"].split(";")[1:])
            assert params["format"] == "s16le" and params["channels"] == "1"
            samples = np.frombuffer(audio.content, dtype="<i2")
            seconds = len(samples) / int(params["rate"])
        else:
            data, sr = sf.read(io.BytesIO(audio.content))
            samples, seconds = data, len(data) / sr
        assert 0.5 < seconds < 10 and np.abs(samples).max() > 0, (fmt, seconds)
        hit = client.http.post("/v1/synthesize", json=body, headers=client.auth(key))
        assert hit.status_code == 200 and hit.headers["X-Cache"] == "HIT"
        assert hit.headers["content-type"].startswith(ctype)


def test_failed_job_shows_its_error_and_has_no_audio(client, key):
    text = " ".join(f"Sentence {i} keeps the worker busy long enough for the failure to arrive first."
                    for i in range(8))
    r = client.http.post("/v1/synthesize", json={"voice_id": HEART.voice_id, "text": text},
                         headers=client.auth(key))
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert_error(client.http.get(f"/v1/jobs/{job_id}/audio", headers=client.auth(key)), 404)
    # The remote worker's completion callback reports a failure; the first terminal transition wins.
    token = callback_token(client.env["MODAL_CALLBACK_SECRET"], job_id, 1)
    cb = client.http.post(f"/v1/jobs/{job_id}/complete?attempt=1",
                          json={"job_id": job_id, "error": "GPU fell over", "error_code": "worker_crashed"},
                          headers={"Authorization": f"Bearer {token}"})
    assert cb.status_code == 200 and cb.json()["status"] == "accepted", cb.text
    job = client.wait_job(key, job_id)
    assert job["status"] == "failed" and job["error"] == "GPU fell over" and job["error_code"] == "worker_crashed"
    assert "audio_url" not in job and "expires_at" not in job
    assert_error(client.http.get(f"/v1/jobs/{job_id}/audio", headers=client.auth(key)), 404)
    assert_error(client.http.post(f"/v1/jobs/{job_id}/complete", json={"job_id": job_id, "error": "x"}), 401)


def test_unknown_jobs_are_404(client, key):
    for unknown in (str(uuid.uuid4()), "not-a-uuid", "9" * 200):
        assert_error(client.http.get(f"/v1/jobs/{unknown}", headers=client.auth(key)), 404, "job_not_found")
        assert_error(client.http.get(f"/v1/jobs/{unknown}/audio", headers=client.auth(key)), 404, "job_not_found")


def test_unknown_route_and_method_use_the_error_body(client, key):
    assert_error(client.http.get("/v1/nothing-here", headers=client.auth(key)), 404, "not_found")
    assert_error(client.http.put("/v1/voices", headers=client.auth(key)), 405, "method_not_allowed")


# Body caps before authentication --------------------------------------------------------------------------
def test_unauthenticated_huge_chunked_body_is_413_before_it_is_read(client):
    piece = b'{"text": "' + b"a" * (256 * 1024 - 10)
    status, body, sent, _ = send_chunked(client, "/v1/synthesize", [piece] * 200,  # 50 MiB
                                         {"Content-Type": "application/json"})
    assert status == 413 and set(body) == {"error"} and body["error"]["code"] == "payload_too_large", body
    print(f"chunked JSON body: 413 after {sent / 2**20:.1f} MiB of 50 MiB sent")
    assert sent < 20 * 1024 * 1024  # the 1 MiB cap plus what the sockets buffer


def test_completion_callback_checks_its_token_before_the_body(client):
    for headers in ({}, {"Authorization": "Bearer not-the-token"},
                    {"Authorization": f"Bearer {client.env['MODAL_CALLBACK_SECRET']}"}):
        r = client.http.post(f"/v1/jobs/{uuid.uuid4()}/complete?attempt=1", content=b"\x00garbage{[",
                             headers={"Content-Type": "application/json", **headers})
        assert_error(r, 401, "invalid_callback_token")


# Delete cascade -----------------------------------------------------------------------------------------
def test_delete_voice_removes_reference_cache_jobs_and_audio(client, wavs):
    key = client.new_key(label="cascade")
    account = key["account_id"]
    voice = client.create_voice(key, wavs.valid_wav(6.0), name="doomed").json()
    vid = voice["voice_id"]
    jobs = []
    for text in ("First words of a doomed voice.", "Second words of a doomed voice."):
        r = client.http.post("/v1/synthesize", json={"voice_id": vid, "text": text}, headers=client.auth(key))
        jobs.append(client.wait_job(key, r.json()["job_id"]))
    assert all(j["status"] == "ready" for j in jobs)
    hit = client.http.post("/v1/synthesize", json={"voice_id": vid, "text": "First words of a doomed voice."},
                           headers=client.auth(key))
    assert hit.headers["X-Cache"] == "HIT"
    files = blobs(client, account)
    assert any(p.name == f"{vid}.wav" for p in files), files
    for job in jobs:
        assert any(job["job_id"] in p.name for p in files), files
    r = client.http.delete(f"/v1/voices/{vid}", headers=client.auth(key))
    assert r.status_code == 204 and r.content == b""
    # At once: the voice, its jobs and their audio answer 404, the cache no longer answers.
    assert_error(client.http.get(f"/v1/voices/{vid}", headers=client.auth(key)), 404, "voice_not_found")
    assert vid not in {v["voice_id"] for v in client.http.get("/v1/voices", headers=client.auth(key)).json()}
    for job in jobs:
        assert_error(client.http.get(f"/v1/jobs/{job['job_id']}", headers=client.auth(key)), 404)
        assert_error(client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key)), 404)
    assert_error(client.http.post("/v1/synthesize", json={"voice_id": vid, "text": "First words of a doomed voice."},
                                  headers=client.auth(key)), 404, "voice_not_found")
    assert_error(client.http.delete(f"/v1/voices/{vid}", headers=client.auth(key)), 404)
    # The objects go: reference, cached and job audio; the presigned URLs stop serving.
    deadline = time.monotonic() + 20
    while blobs(client, account) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert blobs(client, account) == []
    for job in jobs:
        assert client.http.get(job["audio_url"]).status_code == 404


def test_voices_are_listed_a_page_at_a_time(client, wavs):
    key = client.new_key()
    made = []
    for i in range(3):
        r = client.create_voice(key, wavs.valid_wav(6.0), name=f"paged {i}")
        assert r.status_code == 201, r.text
        made.append(r.json()["voice_id"])
    first = client.http.get("/v1/voices", params={"limit": 2}, headers=client.auth(key))
    assert first.status_code == 200
    assert [v["kind"] for v in first.json()].count("system") == 2
    seen = [v["voice_id"] for v in first.json() if v["kind"] == "custom"]
    assert len(seen) == 2 and first.headers["Link"].endswith('rel="next"')
    second = client.http.get("/v1/voices", params={"limit": 2, "cursor": first.headers["X-Next-Cursor"]},
                             headers=client.auth(key))
    assert [v["voice_id"] for v in second.json()] == made[2:] and "X-Next-Cursor" not in second.headers
    assert seen + made[2:] == made
    bad = client.http.get("/v1/voices", params={"cursor": "../../etc"}, headers=client.auth(key))
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"
    too_many = client.http.get("/v1/voices", params={"limit": 10_000}, headers=client.auth(key))
    assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "invalid_request"


def test_keys_are_listed_a_page_at_a_time(client):
    account = client.new_key(label="paging-1")["account_id"]
    extra = [client.new_key(label=f"paging-{i}", account_id=account)["key_id"] for i in (2, 3)]
    first = client.http.get("/v1/keys", params={"account_id": account, "limit": 2}, headers=client.admin())
    assert first.status_code == 200 and len(first.json()) == 2 and "rel=\"next\"" in first.headers["Link"]
    rest = client.http.get("/v1/keys", params={"account_id": account, "limit": 2,
                                                "cursor": first.headers["X-Next-Cursor"]}, headers=client.admin())
    assert [k["key_id"] for k in rest.json()] == extra[1:] and "X-Next-Cursor" not in rest.headers
    assert {k["account_id"] for k in first.json() + rest.json()} == {account}
    assert "api_key" not in first.text and "key_hash" not in first.text
