"""Streamed synthesis over the whole platform: audio that starts before the utterance is finished, still a job
whose whole audio lands in storage and the cache."""
from __future__ import annotations

import io
import json
import struct
import time

import httpx
import numpy as np
import pytest

from timbre_common.audio import decode_wav
from timbre_common.catalogue import SYSTEM_VOICES

from .conftest import running_platform

pytestmark = pytest.mark.e2e
HEART = next(v for v in SYSTEM_VOICES if v.name == "heart")
JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")
FIVE = ("The lighthouse keeper climbed the stairs at dusk. He lit the lamp and watched the sea. "
        "A small boat drifted past the rocks. Its crew waved and sang an old song. "
        "By midnight the harbour was quiet again.")


def _loud(samples: np.ndarray) -> bool:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) > 0.01


def _decode(data: bytes) -> np.ndarray:
    """Any compressed stream, decoded by FFmpeg (a streamed FLAC does not state its length, which libsndfile's
    reader does not accept; players and FFmpeg do)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
    return np.concatenate(frames).astype(np.float32)


def _worker_events(client, event: str, job_id: str) -> list[dict]:
    out = []
    for line in client.platform.log("gpu_worker").splitlines():
        if event in line and job_id in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def test_streamed_wav_miss_is_a_job_stored_and_cached(client):
    key = client.new_key()
    body = {"voice_id": HEART.voice_id, "text": FIVE, "stream": True}
    with client.http.stream("POST", "/v1/synthesize", json=body, headers=client.auth(key)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == "audio/wav"
        assert r.headers.get("transfer-encoding") == "chunked"
        assert (r.headers["X-Cache"], r.headers["X-Voice-Id"], r.headers["X-Backend"]) == \
            ("MISS", HEART.voice_id, "embedded")
        job_id = r.headers["X-Job-Id"]
        streamed = b"".join(r.iter_bytes())
    # A streaming WAV header: unknown sizes, 16-bit mono at the voice's rate.
    assert streamed[:4] == b"RIFF" and struct.unpack("<I", streamed[4:8])[0] == 0xFFFFFFFF
    assert struct.unpack("<HHI", streamed[20:28]) == (1, 1, 24000)
    pcm = np.frombuffer(streamed[44:], "<i2").astype(np.float32) / 32768
    assert _loud(pcm)
    # The stream was made of several pieces, in order, the last one final.
    pieces = _worker_events(client, "stream_piece_sent", job_id)
    assert len(pieces) >= 3 and [p["seq"] for p in pieces] == list(range(len(pieces)))
    assert pieces[-1]["final"] and not any(p["final"] for p in pieces[:-1])

    # The job completes and its stored audio is what was streamed.
    job = client.wait_job(key, job_id)
    assert job["status"] == "ready", job
    stored = client.http.get(f"/v1/jobs/{job_id}/audio", headers=client.auth(key))
    samples, rate = decode_wav(stored.content)
    assert rate == 24000 and samples.shape[0] == pcm.shape[0]
    assert np.max(np.abs(samples.reshape(-1) - pcm)) < 1e-3

    # The same request again is a cache hit: plain, or streamed from the stored audio.
    again = client.http.post("/v1/synthesize", json={**body, "stream": False}, headers=client.auth(key))
    assert again.status_code == 200 and again.headers["X-Cache"] == "HIT"
    with client.http.stream("POST", "/v1/synthesize", json={**body, "response_format": "pcm"},
                            headers=client.auth(key)) as r:
        assert r.status_code == 200 and r.headers["X-Cache"] == "HIT" and r.headers["X-Job-Id"] == job_id
        assert r.headers["content-type"].startswith("audio/pcm; rate=24000")
        hit = b"".join(r.iter_bytes())
    assert hit == streamed[44:]


@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac", "pcm"])
def test_streamed_formats_decode(client, fmt):
    key = client.new_key()
    body = {"voice_id": JOE.voice_id, "text": f"Streaming as {fmt}. It arrives piece by piece.", "stream": True,
            "response_format": fmt}
    with client.http.stream("POST", "/v1/synthesize", json=body, headers=client.auth(key)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["X-Cache"] == "MISS"
        data = b"".join(r.iter_bytes())
    if fmt == "pcm":
        assert r.headers["content-type"].startswith("audio/pcm; rate=22050")
        samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768
    else:
        samples = _decode(data)
    assert samples.size > 22050 and _loud(samples)


def test_streaming_starts_before_the_worker_made_the_last_piece(client):
    """The first piece reaches the client while the worker has not yet made the last one: seen from the
    worker's own events at the moment the client holds its first bytes, and from the job still pending."""
    key = client.new_key()
    text = " ".join(f"Sentence number {i} of this long reading keeps the worker busy for a while." for i in range(40))
    body = {"voice_id": JOE.voice_id, "text": text, "stream": True, "response_format": "pcm"}
    with client.http.stream("POST", "/v1/synthesize", json=body, headers=client.auth(key)) as r:
        assert r.status_code == 200, r.read()
        job_id = r.headers["X-Job-Id"]
        chunks = r.iter_raw()
        first = next(chunks)
        assert first
        # What the worker had done when the client held its first audio (its log line for a piece is written
        # just after the piece left, so it may trail the audio by a moment).
        deadline = time.monotonic() + 10
        while not (sent_then := _worker_events(client, "stream_piece_sent", job_id)) and time.monotonic() < deadline:
            time.sleep(0.01)
        status_then = client.http.get(f"/v1/jobs/{job_id}", headers=client.auth(key)).json()["status"]
        rest = b"".join(chunks)
    assert sent_then and sent_then[0]["seq"] == 0
    total = sent_then[0]["total"]
    assert total > 3
    assert not any(p["final"] for p in sent_then), "the worker had already sent its last piece"
    assert len(sent_then) < total
    assert status_then == "pending"
    # And then it went on to the end.
    sent_after = _worker_events(client, "stream_piece_sent", job_id)
    assert len(sent_after) == total and sent_after[-1]["final"]
    assert len(first) + len(rest) > 22050 * 2 * 10
    assert client.wait_job(key, job_id)["status"] == "ready"


def test_client_that_leaves_early_still_gets_a_stored_cached_job(client):
    key = client.new_key()
    text = " ".join(f"Part {i} of a reading the client will not wait for." for i in range(12))
    body = {"voice_id": HEART.voice_id, "text": text, "stream": True, "response_format": "pcm"}
    with httpx.Client(base_url=client.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/synthesize", json=body, headers=client.auth(key)) as r:
            assert r.status_code == 200
            job_id = r.headers["X-Job-Id"]
            next(r.iter_raw())
        # Leaving the block closes the connection half-way.
    assert client.wait_job(key, job_id)["status"] == "ready"
    hit = client.http.post("/v1/synthesize", json={**body, "stream": False}, headers=client.auth(key))
    assert hit.status_code == 200 and hit.headers["X-Cache"] == "HIT" and hit.headers["X-Job-Id"] == job_id


def test_streamed_request_refused_like_any_other(client):
    key = client.new_key()
    r = client.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": "x" * 5001, "stream": True},
                         headers=client.auth(key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "text_too_long"
    r = client.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": "Bonjour.", "lang": "fr",
                                                 "stream": True}, headers=client.auth(key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_language"


@pytest.fixture(scope="module")
def impatient(database_url, amqp_url, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A platform whose gateway takes a worker silent for 3 s as dead."""
    with running_platform(database_url, amqp_url, tmp_path_factory.mktemp("impatient"),
                          overrides={"STREAM_IDLE_TIMEOUT_S": "3"}) as c:
        yield c


def test_a_worker_that_dies_mid_stream_ends_it_with_an_error_not_a_silent_cut(impatient):
    client = impatient
    key = client.new_key()
    text = " ".join(f"Sentence number {i} of a long passage that keeps the worker busy for a while."
                    for i in range(40))
    body = {"voice_id": JOE.voice_id, "text": text, "stream": True, "response_format": "pcm"}
    received = 0
    with client.http.stream("POST", "/v1/synthesize", json=body, headers=client.auth(key)) as r:
        assert r.status_code == 200
        job_id = r.headers["X-Job-Id"]
        chunks = r.iter_raw()
        received += len(next(chunks))
        client.platform.kill("gpu_worker")
        # The body ends without HTTP's closing chunk: the client's library reports an incomplete body.
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in chunks:
                received += len(chunk)
    broken = [json.loads(line) for line in client.platform.log("gateway").splitlines()
              if "audio_stream_broken" in line and job_id in line]
    assert broken and broken[0]["code"] == "worker_lost"
    # The job itself is not lost: the work order goes back to the queue and a new worker finishes it.
    client.platform.start("gpu_worker")
    job = client.wait_job(key, job_id, timeout=180)
    assert job["status"] == "ready", job
    stored = client.http.get(f"/v1/jobs/{job_id}/audio", headers=client.auth(key))  # in the job's format, pcm
    assert stored.headers["content-type"].startswith("audio/pcm") and len(stored.content) > received


def test_word_timestamps_on_the_job_and_in_the_sse_stream(client):
    key = client.new_key()
    text = "Timestamps mark every word. The second sentence follows a short pause."
    plain = {"voice_id": HEART.voice_id, "text": text}
    # Audio made without timestamps is no hit for a request that asks for them: a new job makes them.
    first = client.http.post("/v1/synthesize", json=plain, headers=client.auth(key))
    assert client.wait_job(key, first.json()["job_id"])["status"] == "ready"
    assert client.http.get(f"/v1/jobs/{first.json()['job_id']}", headers=client.auth(key)).json().get("words") is None
    r = client.http.post("/v1/synthesize", json={**plain, "timestamps": True}, headers=client.auth(key))
    assert r.status_code == 202 and r.headers["X-Cache"] == "MISS"
    job = client.wait_job(key, r.json()["job_id"])
    words = job["words"]
    assert [w["word"] for w in words] == text.split()
    assert all(0 <= w["start"] <= w["end"] <= job["audio_seconds"] + 0.01 for w in words)
    assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:], strict=False))
    # The pause between the sentences lies between "word." and "The".
    assert words[4]["start"] - words[3]["end"] > 0.05
    # Now the cache entry has them: a plain request and one asking for timestamps both hit it.
    for body in (plain, {**plain, "timestamps": True}):
        hit = client.http.post("/v1/synthesize", json=body, headers=client.auth(key))
        assert hit.headers["X-Cache"] == "HIT" and hit.headers["X-Job-Id"] == job["job_id"]

    # In the SSE stream of the OpenAI route: a live stream, then a hit.
    for expected_cache in ("MISS", "HIT"):
        sse = {"model": "tts-1", "voice": "joe", "input": text, "response_format": "pcm", "stream_format": "sse",
               "timestamps": True}
        with client.http.stream("POST", "/v1/audio/speech", json=sse, headers=client.auth(key)) as s:
            assert s.status_code == 200 and s.headers["X-Cache"] == expected_cache
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
            streamed_job = s.headers["X-Job-Id"]
        # The stream ends with its last piece; the job is stored and cached a moment later.
        assert client.wait_job(key, streamed_job)["status"] == "ready"
        [stamps] = [e for e in events if e["type"] == "speech.audio.timestamps"]
        assert [w["word"] for w in stamps["words"]] == text.split()
        assert events[-1]["type"] == "speech.audio.done"


def test_a_stream_in_flight_holds_its_keys_concurrency_slot(client):
    key = client.new_key(label="one-at-a-time", max_concurrent=1)
    text = " ".join(f"Sentence {i} of a reading that takes a while to speak." for i in range(20))
    body = {"voice_id": JOE.voice_id, "text": text, "stream": True, "response_format": "pcm"}
    with client.http.stream("POST", "/v1/synthesize", json=body, headers=client.auth(key)) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        next(chunks)
        second = client.http.get("/v1/voices", headers=client.auth(key))
        assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_concurrent_requests"
        b"".join(chunks)
    assert client.http.get("/v1/voices", headers=client.auth(key)).status_code == 200
