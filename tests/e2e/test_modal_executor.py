"""The Modal path over HTTP: the dispatcher spawns, a fake Modal runs the worker's remote transport and POSTs
the gateway's completion callback; wrong secrets and replays change nothing; the dispatcher survives its own
restart with spawns in flight, and every job then ends ready exactly once."""
from __future__ import annotations

import base64
import json
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from tests.e2e.conftest import running_platform
from timbre_common.audio import decode_wav, encode_wav, parse_wav
from timbre_common.callback_tokens import callback_token
from timbre_common.catalogue import SYSTEM_VOICES
from timbre_gpu_worker.remote import httpx_fetch, httpx_post, process_jobs

pytestmark = pytest.mark.e2e
JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")
HEART = next(v for v in SYSTEM_VOICES if v.name == "heart")


class FakeModal:
    """Takes spawns over HTTP the way the dispatcher's HttpSpawner sends them and runs each payload through
    `timbre_gpu_worker.remote.process_jobs` with the embedded backend, exactly as the Modal app does.

    mode "accept": 200 and run; "refuse": 503, nothing runs; "hang": hold the request until `release()`.
    """

    def __init__(self) -> None:
        from timbre_gpu_worker.alignment import WordAligner
        from timbre_gpu_worker.backends.embedded import EmbeddedBackend

        self.backend = EmbeddedBackend()
        self.backend.load()
        self.aligner = WordAligner()
        self.mode = "accept"
        self.spawned: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.hanging: list[str] = []
        self.sent: list[dict[str, Any]] = []
        self._release = threading.Event()
        self._release_runs = False
        self.running = threading.Event()
        self.running.set()
        self._jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = fake.take(payload)
                body = json.dumps({"call_id": f"fc-{uuid.uuid4().hex[:12]}"} if status == 200 else {}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the caller died while we held its request
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/spawn"
        self._threads = [threading.Thread(target=self.server.serve_forever, daemon=True),
                         threading.Thread(target=self._run_jobs, daemon=True)]
        for t in self._threads:
            t.start()

    def take(self, payload: dict[str, Any]) -> int:
        with self._lock:
            mode = self.mode
            if mode == "refuse":
                self.refused.append(payload["job_id"])
                return 503
            if mode == "hang":
                self.hanging.append(payload["job_id"])
        if mode == "hang":
            self._release.wait(120)
            if not self._release_runs:
                return 503
        with self._lock:
            self.spawned.append(payload)
        self._jobs.put(payload)
        return 200

    def release(self, *, run: bool) -> None:
        """Answer the held spawns; `run` = the calls were accepted (their callers may be gone)."""
        self._release_runs = run
        self._release.set()

    def _run_jobs(self) -> None:
        # One container: payloads that queued up together form one batch, like @modal.batched.
        while (first := self._jobs.get()) is not None:
            self.running.wait()
            batch = [first]
            while not self._jobs.empty() and len(batch) < 8:
                batch.append(self._jobs.get_nowait())
            sent = process_jobs(batch, self.backend_for, httpx_fetch, httpx_post, aligner=self.aligner)
            with self._lock:
                self.sent.extend(sent)

    def backend_for(self, name: str) -> Any:
        if name != "embedded":
            raise RuntimeError(f"backend {name} is not in this fake")
        return self.backend

    def sent_for(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [b for b in self.sent if b["job_id"] == job_id]

    def close(self) -> None:
        self._release.set()
        self._jobs.put(None)
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def modal() -> Iterator[FakeModal]:
    fake = FakeModal()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def platform(database_url, amqp_url, tmp_path_factory, modal: FakeModal):  # type: ignore[no-untyped-def]
    """Embedded jobs go through the Modal executor; the local worker runs no backend at all."""
    overrides = {"EXECUTOR": "modal", "MODAL_BACKENDS": "embedded", "MODAL_SPAWN_URL": modal.url, "BACKENDS": "",
                 # The recovery test holds spawns far longer than a default deadline would allow.
                 "JOB_DEADLINE_S": "600"}
    with running_platform(database_url, amqp_url, tmp_path_factory.mktemp("modal-platform"),
                          overrides=overrides) as client:
        yield client


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _callback(client, job_id: str, body: dict[str, Any], token: str, attempt: int = 1):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.http.post(f"/v1/jobs/{job_id}/complete?attempt={attempt}", json=body, headers=headers)


def _token(client, job_id: str, attempt: int = 1) -> str:  # type: ignore[no-untyped-def]
    return callback_token(client.env["MODAL_CALLBACK_SECRET"], job_id, attempt)


def _forged_body(job_id: str) -> dict[str, Any]:
    wav = encode_wav(np.full(24000, 0.5, dtype=np.float32), 24000)
    return {"job_id": job_id, "wav_b64": base64.b64encode(wav).decode(), "synthesis_ms": 1, "audio_seconds": 1.0}


def _submit(client, key, voice_id: str, text: str) -> str:  # type: ignore[no-untyped-def]
    r = client.http.post("/v1/synthesize", json={"voice_id": voice_id, "text": text}, headers=client.auth(key))
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def test_health_advertises_the_modal_backend_and_the_local_worker_serves_none(platform):
    body = platform.http.get("/v1/health").json()
    assert (body["status"], body["backends"]) == ("ok", ["embedded"])
    assert '"backends": []' in platform.platform.log("gpu_worker")


def test_a_job_goes_spawn_callback_storage_ready(platform, modal: FakeModal):
    key = platform.new_key()
    job_id = _submit(platform, key, JOE.voice_id, "Spoken on a remote GPU and reported back by callback.")
    job = platform.wait_job(key, job_id)
    assert job["status"] == "ready", job
    [payload] = [p for p in modal.spawned if p["job_id"] == job_id]
    assert payload["backend"] == "embedded" and payload["system_voice"] == "joe"
    assert payload["callback_url"] == f"{platform.base_url}/v1/jobs/{job_id}/complete?attempt=1"
    # The remote host holds a token for this job and attempt, never the callback secret.
    assert payload["callback_token"] == _token(platform, job_id)
    assert platform.env["MODAL_CALLBACK_SECRET"] not in json.dumps(payload) and "callback_secret" not in payload
    [sent] = modal.sent_for(job_id)
    assert sent["error"] is None and sent["rtf"] > 0
    # The job carries the remote worker's timings; the stored audio is the bytes it sent.
    assert job["synthesis_ms"] == sent["synthesis_ms"] and job["audio_seconds"] == sent["audio_seconds"]
    audio = platform.http.get(f"/v1/jobs/{job_id}/audio", headers=platform.auth(key)).content
    assert audio == base64.b64decode(sent["wav_b64"])
    assert parse_wav(audio).duration_s == pytest.approx(sent["audio_seconds"], abs=0.01)
    spawned = rf'"modal_call_spawned".*{job_id}|{job_id}.*"modal_call_spawned"'
    assert re.search(spawned, platform.platform.log("dispatcher"))


def test_a_streamed_job_on_modal_posts_its_pieces_as_chunk_callbacks(platform, modal: FakeModal):
    key = platform.new_key()
    text = ("Spoken on a remote machine, piece by piece. Each piece is posted back as it is made. The gateway "
            "forwards it to the connection that waits. And the whole lands in storage.")
    body = {"voice_id": JOE.voice_id, "text": text, "stream": True, "response_format": "pcm", "timestamps": True}
    with platform.http.stream("POST", "/v1/synthesize", json=body, headers=platform.auth(key)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["X-Cache"] == "MISS" and r.headers["content-type"].startswith("audio/pcm; rate=22050")
        job_id = r.headers["X-Job-Id"]
        streamed = b"".join(r.iter_bytes())
    [payload] = [p for p in modal.spawned if p["job_id"] == job_id]
    assert payload["chunk_url"] == f"{platform.base_url}/v1/jobs/{job_id}/chunks?attempt=1"
    assert payload["stream_to"].startswith(f"{platform.env['BUS_NAMESPACE']}.gateway.stream.")
    job = platform.wait_job(key, job_id)
    assert job["status"] == "ready", job
    # Word timestamps travel in the completion callback too.
    assert [w["word"] for w in job["words"]] == text.split()
    # The completion callback's WAV is exactly the pieces streamed.
    [sent] = modal.sent_for(job_id)
    samples, rate = decode_wav(base64.b64decode(sent["wav_b64"]))
    assert rate == 22050 and np.array_equal(np.round(samples.reshape(-1) * 32767).astype("<i2").tobytes(), streamed)
    # The chunk callback takes the attempt's token (never the secret itself) and only names this deployment's
    # stream queues.
    piece = {"job_id": job_id, "stream_to": payload["stream_to"], "stream_id": payload["stream_id"], "seq": 0,
             "sample_rate": 22050, "pcm_b64": ""}
    url = f"/v1/jobs/{job_id}/chunks?attempt=1"
    assert platform.http.post(url, json=piece).status_code == 401
    secret = {"Authorization": f"Bearer {platform.env['MODAL_CALLBACK_SECRET']}"}
    assert platform.http.post(url, json=piece, headers=secret).status_code == 401
    token = {"Authorization": f"Bearer {callback_token(platform.env['MODAL_CALLBACK_SECRET'], job_id, 1)}"}
    wrong = platform.http.post(url, json={**piece, "stream_to": "other.queue"}, headers=token)
    assert wrong.status_code == 422 and wrong.json()["error"]["code"] == "invalid_stream"


def test_wrong_token_is_refused_and_a_replay_is_ignored(platform, modal: FakeModal):
    key = platform.new_key()
    job_id = _submit(platform, key, HEART.voice_id, "A finished job keeps its first audio.")
    assert platform.wait_job(key, job_id)["status"] == "ready"
    audio = platform.http.get(f"/v1/jobs/{job_id}/audio", headers=platform.auth(key)).content
    [sent] = modal.sent_for(job_id)
    other_job = str(uuid.uuid4())
    for token in ("wrong-token", "", _token(platform, job_id)[:-1], _token(platform, other_job),
                  # The secret itself opens nothing any more.
                  platform.env["MODAL_CALLBACK_SECRET"]):
        r = _callback(platform, job_id, _forged_body(job_id), token)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_callback_token", r.text
    # The same callback delivered again, and a different one for the finished job: both ignored.
    for body in (sent, _forged_body(job_id)):
        r = _callback(platform, job_id, body, _token(platform, job_id))
        assert r.status_code == 200 and r.json() == {"status": "ignored"}, r.text
    assert platform.http.get(f"/v1/jobs/{job_id}/audio", headers=platform.auth(key)).content == audio
    assert platform.wait_job(key, job_id)["status"] == "ready"


def test_a_superseded_attempts_callback_changes_nothing(platform, modal: FakeModal):
    """A job handed out again (attempt 2): the first attempt's late callback, correctly signed for attempt 1, is
    ignored; the current attempt's completes the job."""
    key = platform.new_key()
    modal.mode = "refuse"
    try:
        job_id = _submit(platform, key, JOE.voice_id, "Only the newest attempt may finish this job.")
        _wait(lambda: job_id in modal.refused, 30, "the spawn refused")
        platform.sql("UPDATE dispatch.jobs SET attempts = 2 WHERE job_id = $1", uuid.UUID(job_id))
        r = _callback(platform, job_id, _forged_body(job_id), _token(platform, job_id, 1), attempt=1)
        assert r.status_code == 200 and r.json() == {"status": "ignored"}, r.text
        assert platform.http.get(f"/v1/jobs/{job_id}", headers=platform.auth(key)).json()["status"] == "pending"
        r = _callback(platform, job_id, {"job_id": job_id, "error": "late GPU", "error_code": "worker_crashed"},
                      _token(platform, job_id, 2), attempt=2)
        assert r.status_code == 200 and r.json() == {"status": "accepted"}, r.text
    finally:
        modal.mode = "accept"
    job = platform.wait_job(key, job_id)
    assert job["status"] == "failed" and job["error_code"] == "worker_crashed", job


def test_dispatcher_restart_with_spawns_in_flight_ends_each_job_ready_once(platform, modal: FakeModal):
    key = platform.new_key()
    texts = [f"Job number {i} waits for a GPU that is not answering yet." for i in range(3)]
    # 1. Modal refuses: the work orders are retried, not lost.
    modal.mode = "refuse"
    jobs = [_submit(platform, key, JOE.voice_id, t) for t in texts]
    _wait(lambda: set(jobs) <= set(modal.refused), 30, "a refused spawn of every job")
    # 2. Modal hangs: the retried spawns are held in flight, their work orders unacked.
    modal.mode = "hang"
    _wait(lambda: set(jobs) <= set(modal.hanging), 30, "a held spawn of every job")
    # A callback with a wrong secret for a pending job changes nothing.
    r = _callback(platform, jobs[0], _forged_body(jobs[0]), "not-the-token")
    assert r.status_code == 401
    assert platform.http.get(f"/v1/jobs/{jobs[0]}", headers=platform.auth(key)).json()["status"] == "pending"
    # 3. The dispatcher dies with the spawns in flight, and Modal had in fact accepted those calls
    #    (their runs are held back until the re-spawns are in, so every job surely runs twice).
    platform.platform.kill("dispatcher")
    modal.running.clear()
    modal.mode = "accept"
    modal.release(run=True)
    # 4. The restarted dispatcher gets the unacked orders again and spawns each job a second time.
    platform.platform.start("dispatcher")
    _wait(lambda: all(sum(p["job_id"] == j for p in modal.spawned) == 2 for j in jobs), 60,
          "every job spawned again by the restarted dispatcher")
    modal.running.set()
    for job_id in jobs:
        job = platform.wait_job(key, job_id, timeout=120)
        assert job["status"] == "ready", job
    # Each job was run twice by "Modal"...
    _wait(lambda: all(len(modal.sent_for(j)) == 2 for j in jobs), 60, "both callbacks of every job")
    # ...yet went ready once, with the audio of one of its callbacks, and was billed once.
    log = platform.platform.log("dispatcher")
    for job_id in jobs:
        assert len(re.findall(rf'"event": "job_ready"[^\n]*{job_id}|{job_id}[^\n]*"event": "job_ready"', log)) == 1
        audio = platform.http.get(f"/v1/jobs/{job_id}/audio", headers=platform.auth(key)).content
        assert audio in {base64.b64decode(b["wav_b64"]) for b in modal.sent_for(job_id)}
        samples, _ = decode_wav(audio)
        assert np.all(np.isfinite(samples)) and float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) > 0.01
    expected = sum(len(t) for t in texts)
    _wait(lambda: platform.http.get("/v1/usage", headers=platform.auth(key)).json()["characters_used"] >= expected,
          30, "usage to be recorded")
    usage = platform.http.get("/v1/usage", headers=platform.auth(key)).json()
    assert usage["characters_used"] == expected, usage
