"""Bounds over HTTP: a format is encoded once per job, an Idempotency-Key keeps a reference and not audio (and
goes with its account), pending jobs per account are capped, and a full work queue is refused with 503."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from timbre_common.catalogue import SYSTEM_VOICES

from .conftest import Client, running_platform

pytestmark = pytest.mark.e2e
HEART = next(v for v in SYSTEM_VOICES if v.name == "heart")
MAX_PENDING, QUEUE_LENGTH = 3, 4
MAX_UPLOADS, MAX_VOICES = 3, 2


@pytest.fixture(scope="module")
def bounded(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    with running_platform(database_url, amqp_url, tmp_path_factory.mktemp("bounded"), overrides={
            "MAX_PENDING_JOBS_PER_ACCOUNT": str(MAX_PENDING), "WORK_QUEUE_MAX_LENGTH": str(QUEUE_LENGTH),
            "MAX_ACCOUNT_UPLOADS": str(MAX_UPLOADS), "MAX_VOICES_PER_ACCOUNT": str(MAX_VOICES)}) as c:
        yield c


def test_a_format_is_encoded_once_and_replays_keep_no_audio(bounded: Client) -> None:
    client = bounded
    key = client.new_key()
    body = {"voice_id": HEART.voice_id, "text": "Encoded once, read many times.", "response_format": "opus"}
    job = client.wait_job(key, client.http.post("/v1/synthesize", json=body, headers=client.auth(key))
                          .json()["job_id"])
    assert job["status"] == "ready", job
    first = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key))
    second = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key))
    assert first.status_code == second.status_code == 200 and first.content[:4] == b"OggS"
    # The second download read the kept rendition: the same bytes, one object beside the WAV.
    assert second.content == first.content
    renditions = client.sql("SELECT key, expires_at FROM storage.objects WHERE account_id = $1 AND key LIKE '%.opus'",
                            key["account_id"])
    source = client.sql("SELECT expires_at FROM storage.objects WHERE account_id = $1 AND key LIKE '%.wav'",
                        key["account_id"])
    assert len(renditions) == 1 and renditions[0]["expires_at"] == source[0]["expires_at"]

    # A cache hit with an Idempotency-Key: the record keeps the job and format, not the audio.
    idem = client.auth(key) | {"Idempotency-Key": "replay-" + uuid.uuid4().hex}
    hit = client.http.post("/v1/synthesize", json=body, headers=idem)
    assert hit.status_code == 200 and hit.headers["X-Cache"] == "HIT" and hit.content == first.content
    [record] = client.sql("SELECT octet_length(body) AS size, job_id::text AS job_id, audio_format "
                          "FROM gateway.idempotency_keys WHERE account_id = $1", uuid.UUID(key["account_id"]))
    assert (record["size"], record["job_id"], record["audio_format"]) == (0, job["job_id"], "opus")
    replay = client.http.post("/v1/synthesize", json=body, headers=idem)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.content == first.content and replay.headers["X-Job-Id"] == job["job_id"]
    assert replay.headers["content-type"].startswith("audio/ogg")

    # The purge takes the record with the account: nothing of it stays replayable.
    purge = client.http.delete("/v1/account", headers=client.auth(key))
    assert purge.status_code in (200, 202), purge.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = client.sql("SELECT count(*) AS n FROM gateway.idempotency_keys WHERE account_id = $1",
                          uuid.UUID(key["account_id"]))[0]["n"]
        objects = client.sql("SELECT count(*) AS n FROM storage.objects WHERE account_id = $1",
                             key["account_id"])[0]["n"]
        if left == 0 and objects == 0:
            break
        time.sleep(0.2)
    assert (left, objects) == (0, 0)


@contextmanager
def idle_worker(client: Client) -> Iterator[None]:
    """The GPU worker is stopped, and a stand-in keeps advertising its backend: work orders pile up."""
    from timbre_common.contracts.synthesis import WorkerHeartbeat
    from timbre_common.messaging import Bus

    client.platform.stop("gpu_worker")
    stop = threading.Event()

    async def beat() -> None:
        bus = await Bus(url=client.env["AMQP_URL"], namespace=client.env["BUS_NAMESPACE"],
                        service="e2e-heartbeat").connect()
        try:
            while not stop.is_set():
                await bus.publish(WorkerHeartbeat(worker_id="e2e-idle", backends=["embedded"], interval_s=1))
                await asyncio.sleep(0.5)
        finally:
            await bus.close()

    thread = threading.Thread(target=lambda: asyncio.run(beat()), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        client.platform.start("gpu_worker")


def test_pending_jobs_are_capped_and_a_full_work_queue_is_refused(bounded: Client) -> None:
    client = bounded
    with idle_worker(client):
        first = client.new_key()
        accepted = []
        for n in range(MAX_PENDING):
            r = client.http.post("/v1/synthesize", json={"voice_id": HEART.voice_id, "text": f"Pending {n}."},
                                 headers=client.auth(first))
            assert r.status_code == 202, r.text
            accepted.append(r.json()["job_id"])
        over = client.http.post("/v1/synthesize", json={"voice_id": HEART.voice_id, "text": "One too many."},
                                headers=client.auth(first))
        assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_pending_jobs"
        assert int(over.headers["Retry-After"]) > 0
        assert client.sql("SELECT count(*) AS n FROM dispatch.jobs WHERE account_id = $1",
                          first["account_id"])[0]["n"] == MAX_PENDING

        # Other accounts fill the work queue up to its length; the next work order is refused, not queued.
        refused = None
        for n in range(QUEUE_LENGTH + 2):
            other = client.new_key()
            r = client.http.post("/v1/synthesize", json={"voice_id": HEART.voice_id, "text": f"Queued {n}."},
                                 headers=client.auth(other))
            if r.status_code != 202:
                refused = (r, other)
                break
            accepted.append(r.json()["job_id"])
        assert refused is not None, "the work queue never refused"
        r, other = refused
        assert r.status_code == 503 and r.json()["error"]["code"] == "work_queue_full", r.text
        assert int(r.headers["Retry-After"]) > 0
        # The refused job does not stay pending: it ended failed, with the reason.
        [job] = client.sql("SELECT status, error_code FROM dispatch.jobs WHERE account_id = $1", other["account_id"])
        assert (job["status"], job["error_code"]) == ("failed", "work_queue_full")
    # With the worker back, every accepted job is served.
    for job_id in accepted[:MAX_PENDING]:
        assert client.wait_job(first, job_id)["status"] == "ready"


def _upload(client: Client, key: dict, data: bytes, purpose: str = "voice_clone") -> object:
    return client.http.post("/v1/uploads", headers=client.auth(key), data={"purpose": purpose},
                            files={"file": ("clip.wav", data, "audio/wav")})


def test_uploads_and_voices_are_capped_and_a_voice_keeps_the_upload_it_was_made_from(bounded: Client, wavs) -> None:
    client = bounded
    key = client.new_key()
    uploads = [_upload(client, key, wavs.valid_wav(6.0)) for _ in range(MAX_UPLOADS)]
    assert [u.status_code for u in uploads] == [201] * MAX_UPLOADS
    over = _upload(client, key, wavs.valid_wav(6.0))
    assert over.status_code == 409 and over.json()["error"]["code"] == "upload_limit_reached"

    # A voice made from an upload claims it: the upload stops expiring.
    first = uploads[0].json()
    voice = client.http.post("/v1/voices", headers=client.auth(key), data={"name": "claimed",
                                                                          "upload_id": first["upload_id"]})
    assert voice.status_code == 201, voice.text
    [claimed] = client.sql("SELECT o.expires_at FROM storage.objects o JOIN storage.uploads u ON u.key = o.key "
                           "WHERE u.upload_id = $1", first["upload_id"])
    assert claimed["expires_at"] is None
    unclaimed = client.sql("SELECT o.expires_at FROM storage.objects o JOIN storage.uploads u ON u.key = o.key "
                           "WHERE u.upload_id = $1", uploads[1].json()["upload_id"])
    assert unclaimed[0]["expires_at"] is not None

    assert client.create_voice(key, wavs.valid_wav(6.0), name="second").status_code == 201
    third = client.create_voice(key, wavs.valid_wav(6.0), name="third")
    assert third.status_code == 409 and third.json()["error"]["code"] == "voice_limit_reached"

    # Deleting the voice takes the upload it claimed.
    assert client.http.delete(f"/v1/voices/{voice.json()['voice_id']}", headers=client.auth(key)).status_code == 204
    deadline = time.monotonic() + 20
    while client.sql("SELECT 1 FROM storage.uploads WHERE upload_id = $1", first["upload_id"]):
        assert time.monotonic() < deadline, "the claimed upload outlived its voice"
        time.sleep(0.2)


def test_deleting_a_voice_forgets_the_idempotent_answers_about_it(bounded: Client, wavs) -> None:
    client = bounded
    key = client.new_key()
    idem = client.auth(key) | {"Idempotency-Key": "voice-" + uuid.uuid4().hex}
    voice = client.http.post("/v1/voices", headers=idem, data={"name": "short-lived"},
                             files={"ref_audio": ("ref.wav", wavs.valid_wav(6.0), "audio/wav")})
    assert voice.status_code == 201, voice.text
    synth = client.http.post("/v1/synthesize", json={"voice_id": voice.json()["voice_id"], "text": "Soon gone."},
                             headers=client.auth(key) | {"Idempotency-Key": "synth-" + uuid.uuid4().hex})
    assert synth.status_code == 202, synth.text
    account = uuid.UUID(key["account_id"])
    assert client.sql("SELECT count(*) AS n FROM gateway.idempotency_keys WHERE account_id = $1",
                      account)[0]["n"] == 2
    assert client.http.delete(f"/v1/voices/{voice.json()['voice_id']}", headers=client.auth(key)).status_code == 204
    assert client.sql("SELECT count(*) AS n FROM gateway.idempotency_keys WHERE account_id = $1",
                      account)[0]["n"] == 0
    # The retry runs again rather than bringing the deleted voice back.
    again = client.http.post("/v1/voices", headers=idem, data={"name": "short-lived"},
                             files={"ref_audio": ("ref.wav", wavs.valid_wav(6.0), "audio/wav")})
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
    assert again.json()["voice_id"] != voice.json()["voice_id"]
