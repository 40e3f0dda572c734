"""The hot path: a cache hit, a ready job's poll and its audio answered by the gateway alone (its read models and
a read-only reader of the bucket), and every invalidation effective at once: a deleted voice, an expired
object, a purged account and a revoked key stop being served."""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from timbre_common.catalogue import SYSTEM_VOICES

JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")


def _dispatcher_hits(client: Any) -> float:
    return sum(v for (name, labels), v in client.scrape("dispatcher").items()
               if name == "timbre_synthesis_cache_lookups_total" and dict(labels).get("result") == "hit")


def _poll(what: str, check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout}s")


def _served_by_gateway(client: Any, key: dict, voice_id: str, text: str) -> bool:
    before = _dispatcher_hits(client)
    return _hit(client, key, voice_id, text).status_code == 200 and _dispatcher_hits(client) == before


def _ready(client: Any, key: dict, voice_id: str, text: str, **extra: Any) -> dict:
    r = client.http.post("/v1/synthesize", json={"voice_id": voice_id, "text": text, **extra},
                         headers=client.auth(key))
    assert r.status_code == 202, r.text
    job = client.wait_job(key, r.json()["job_id"])
    assert job["status"] == "ready", job
    return job


def _hit(client: Any, key: dict, voice_id: str, text: str, **extra: Any) -> Any:
    return client.http.post("/v1/synthesize", json={"voice_id": voice_id, "text": text, **extra},
                            headers=client.auth(key))


def test_hit_poll_and_download_are_answered_without_the_dispatcher(client):
    key = client.new_key()
    text = f"The hot path answers alone, take {uuid.uuid4().hex[:8]}."
    job = _ready(client, key, JOE.voice_id, text)
    # The job's timings: queued, synthesizing, storing, within its time from creation to ready.
    timings = job["timings"]
    assert timings["synthesis_ms"] == job["synthesis_ms"] and timings["total_ms"] > 0
    assert timings["queued_ms"] + timings["synthesis_ms"] + timings["stored_ms"] <= timings["total_ms"] + 5
    # The job.ready event reaches the gateway's read models shortly after the job is ready.
    _poll("hit served by the gateway", lambda: _served_by_gateway(client, key, JOE.voice_id, text))
    before = _dispatcher_hits(client)
    for fmt in ("wav", "mp3"):
        hit = _hit(client, key, JOE.voice_id, text, response_format=fmt)
        assert hit.status_code == 200 and hit.headers["X-Cache"] == "HIT", hit.text
        assert hit.headers["X-Job-Id"] == job["job_id"] and hit.headers["X-Voice-Id"] == JOE.voice_id
        assert hit.headers["content-type"].startswith("audio/wav" if fmt == "wav" else "audio/mpeg")
        assert hit.content[:4] == b"RIFF" if fmt == "wav" else hit.content[:4] != b"RIFF"
    view = client.http.get(f"/v1/jobs/{job['job_id']}", headers=client.auth(key))
    assert view.status_code == 200 and view.json()["status"] == "ready" and view.json()["audio_url"], view.text
    assert {k: v for k, v in view.json().items() if k != "audio_url"} == \
        {k: v for k, v in job.items() if k != "audio_url"}
    url = httpx_get(view.json()["audio_url"])
    audio = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key))
    assert audio.status_code == 200 and audio.content == url == _hit(client, key, JOE.voice_id, text).content
    # The wav hit was served by the gateway; the mp3 one asked the dispatcher once (storage made the rendition),
    # after which the gateway reads it from the bucket as well.
    assert _dispatcher_hits(client) - before <= 1
    assert _hit(client, key, JOE.voice_id, text, response_format="mp3").status_code == 200
    assert _dispatcher_hits(client) - before <= 1
    # Another account's key gets nothing of it: its own miss.
    other = client.new_key()
    assert _hit(client, other, JOE.voice_id, text).status_code == 202
    assert client.http.get(f"/v1/jobs/{job['job_id']}", headers=client.auth(other)).status_code == 404
    assert client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(other)).status_code == 404


def httpx_get(url: str) -> bytes:
    import httpx

    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, r.text
    return r.content


def test_a_deleted_voice_stops_being_served_at_once(client, wavs):
    key = client.new_key()
    voice = client.create_voice(key, wavs.valid_wav(6.0), name="fleeting").json()
    text = "Words of a voice about to go."
    job = _ready(client, key, voice["voice_id"], text)
    _poll("hit served by the gateway", lambda: _served_by_gateway(client, key, voice["voice_id"], text))
    assert client.http.delete(f"/v1/voices/{voice['voice_id']}", headers=client.auth(key)).status_code == 204
    gone = _hit(client, key, voice["voice_id"], text)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "voice_not_found", gone.text
    assert client.http.get(f"/v1/jobs/{job['job_id']}", headers=client.auth(key)).status_code == 404
    assert client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key)).status_code == 404


def test_an_expired_object_stops_being_served(client):
    key = client.new_key()
    text = f"Audio that will expire, take {uuid.uuid4().hex[:8]}."
    job = _ready(client, key, JOE.voice_id, text)
    _poll("hit served by the gateway", lambda: _served_by_gateway(client, key, JOE.voice_id, text))
    root = Path(client.env["STORAGE_ROOT"])
    [path] = list((root / "generations" / key["account_id"]).rglob(f"*-{job['job_id']}.wav"))
    object_key = path.relative_to(root).as_posix()
    client.sql("UPDATE storage.objects SET expires_at = now() - interval '1 second' WHERE key = $1", object_key)
    # The sweep deletes it and announces objects.expired: from then on the gateway serves nothing of it.
    _poll("expired object swept", lambda: not path.exists())
    again = _hit(client, key, JOE.voice_id, text)
    assert again.status_code == 202 and again.headers["X-Cache"] == "MISS", again.text
    audio = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key))
    assert audio.status_code in (404, 410), audio.text


def test_a_purged_account_and_a_revoked_key_stop_being_served_at_once(client):
    key = client.new_key()
    second = client.new_key(account_id=key["account_id"])
    text = f"An account about to be purged, take {uuid.uuid4().hex[:8]}."
    job = _ready(client, key, JOE.voice_id, text)
    _poll("hit served by the gateway", lambda: _served_by_gateway(client, key, JOE.voice_id, text))
    # The second key is used, so the gateway holds it in memory; revoked, it is refused at once (the revocation
    # drops it here and announces account.keys_changed to the other instances).
    assert _hit(client, second, JOE.voice_id, text).status_code == 200
    assert client.http.delete(f"/v1/keys/{second['key_id']}", headers=client.admin()).status_code == 204
    revoked = _hit(client, second, JOE.voice_id, text)
    assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "invalid_api_key", revoked.text
    assert _hit(client, key, JOE.voice_id, text).status_code == 200
    # Named in capitals (a valid spelling of the same id): its keys held in memory are dropped all the same.
    purge = client.http.delete(f"/v1/admin/accounts/{key['account_id'].upper()}", headers=client.admin())
    assert purge.status_code in (200, 202), purge.text
    for call in (lambda: _hit(client, key, JOE.voice_id, text),
                 lambda: client.http.get(f"/v1/jobs/{job['job_id']}", headers=client.auth(key)),
                 lambda: client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key))):
        # 401 once the gateway's own share of the purge (the keys) is done; never the audio again either way.
        assert call().status_code in (401, 404)


def test_a_changed_key_limit_applies_at_once(client):
    key = client.new_key()
    text = f"A key whose limit changes, take {uuid.uuid4().hex[:8]}."
    _ready(client, key, JOE.voice_id, text)
    _poll("hit served by the gateway", lambda: _served_by_gateway(client, key, JOE.voice_id, text))
    changed = client.http.patch(f"/v1/keys/{key['key_id']}", json={"rate_per_minute": 1}, headers=client.admin())
    assert changed.status_code == 200, changed.text
    # The key held in memory with its old limit is dropped: the new one (1 a minute) holds from the next request.
    answers = [_hit(client, key, JOE.voice_id, text).status_code for _ in range(3)]
    assert 429 in answers, answers
