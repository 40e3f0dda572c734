"""Qwen3-TTS over the broker: a worker process loads a tiny random-weight model of the real architecture
through the production loading code and clones voices in both modes (in-context with a transcript,
x-vector without), reusing each voice's prompt and batching jobs that arrive together."""
from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.e2e.conftest import ROOT, Client, load_module, running_platform
from timbre_common.audio import decode_wav, parse_wav
from timbre_common.catalogue import SYSTEM_VOICES

pytestmark = pytest.mark.e2e
if importlib.util.find_spec("qwen_tts") is None:  # pragma: no cover - the CI image installs requirements/qwen*.txt
    raise RuntimeError("qwen-tts is not installed: pip install --no-deps -r requirements/qwen-nodeps.txt")

JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")
QWEN = "qwen3-0.6b"
WORKER = "gpu_worker_qwen"
REFERENCE_TEXT = ("This is my reference recording. I am reading a few calm sentences so that my voice "
                  "can be cloned by the service.")


@pytest.fixture(scope="module")
def qwen(database_url, amqp_url, tmp_path_factory) -> Iterator[Client]:  # type: ignore[no-untyped-def]
    """The default platform plus a second worker serving only qwen3-0.6b from a tiny model on disk."""
    tiny = load_module("timbre_qwen_tiny", ROOT / "gpu_worker" / "tests" / "qwen_tiny.py")
    model_dir = tiny.build_tiny_model(tmp_path_factory.mktemp("qwen3-tiny"))
    # A wide batching window: jobs submitted one HTTP call after another still meet in one batch.
    worker_env = {"BACKENDS": QWEN, "QWEN3_0_6B_MODEL_DIR": str(model_dir), "BATCH_WINDOW_MS": "300"}
    # CPU synthesis is slow and wait_job polls 4 times a second: lift the per-key rate limit.
    with running_platform(database_url, amqp_url, tmp_path_factory.mktemp("qwen-platform"),
                          overrides={"RATE_LIMIT_PER_MINUTE": "100000"},
                          extra_workers={WORKER: worker_env}, wait_for_backend=QWEN) as client:
        yield client


@pytest.fixture(scope="module")
def key(qwen: Client) -> dict:
    return qwen.new_key()


@pytest.fixture(scope="module")
def reference(qwen: Client, key: dict) -> bytes:
    """About eight seconds of real speech (the bundled 'joe' voice) to clone from."""
    r = qwen.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": REFERENCE_TEXT},
                       headers=qwen.auth(key))
    job = qwen.wait_job(key, r.json()["job_id"])
    assert job["status"] == "ready", job
    return qwen.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=qwen.auth(key)).content


def _log_events(client: Client, name: str, event: str) -> list[dict[str, Any]]:
    out = []
    for line in client.platform.log(name).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            out.append(record)
    return out


def _completed(client: Client, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in _log_events(client, WORKER, "synthesis_completed") if r.get("job_id") == job_id]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no synthesis_completed for {job_id}\n{client.tail_logs()}")


def _profiled_voice(client: Client, key: dict, reference: bytes, name: str, **fields: str) -> dict:
    """Create a qwen voice and wait for the worker's profile (the prompt computed from VoiceRegistered)."""
    created = client.create_voice(key, reference, name=name, backend=QWEN, **fields)
    assert created.status_code == 201, created.text
    voice = created.json()
    assert voice["backend"] == QWEN
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        profile = client.http.get(f"/v1/voices/{voice['voice_id']}", headers=client.auth(key)).json()["profile"]
        if profile and profile.get(QWEN):
            return {**voice, "profile": profile[QWEN]}
        time.sleep(0.2)
    raise AssertionError(f"voice {voice['voice_id']} never profiled\n{client.tail_logs()}")


def _synthesize(client: Client, key: dict, voice_id: str, text: str, **extra: str) -> str:
    r = client.http.post("/v1/synthesize", json={"voice_id": voice_id, "text": text, **extra},
                         headers=client.auth(key))
    assert r.status_code == 202, r.text
    assert r.headers["X-Backend"] == QWEN
    return r.json()["job_id"]


def _check_audio(client: Client, key: dict, job: dict) -> bytes:
    audio = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key)).content
    info = parse_wav(audio)
    assert info.sample_rate == 24000 and info.channels == 1
    samples, _ = decode_wav(audio)
    assert samples.size > 0 and np.all(np.isfinite(samples))
    assert float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) > 1e-3, "audio is silence"
    assert job["audio_seconds"] == pytest.approx(info.duration_s, abs=0.01)
    return audio


def test_health_lists_embedded_and_the_qwen_backend_with_weights(qwen: Client):
    body = qwen.http.get("/v1/health").json()
    assert body["status"] == "ok" and set(body["backends"]) == {"embedded", QWEN}, body
    # qwen3-1.7b has no weights anywhere: not advertised, and the worker said why.
    assert "qwen3-1.7b" not in body["backends"]


@pytest.mark.parametrize(("mode", "fields"), [("icl", {"ref_text": REFERENCE_TEXT}), ("xvector", {})])
def test_cloning_mode_end_to_end_with_the_prompt_computed_once(qwen: Client, key: dict, reference: bytes,
                                                               mode: str, fields: dict[str, str]):
    voice = _profiled_voice(qwen, key, reference, f"clone {mode}", **fields)
    # The prompt was computed when the voice was registered, not by a job.
    assert voice["profile"]["mode"] == mode and voice["profile"]["prompt_cached"] is False, voice["profile"]
    jobs = []
    for text in ("Hello from a cloned voice.", "A second sentence in the same voice, with the same prompt."):
        job = qwen.wait_job(key, _synthesize(qwen, key, voice["voice_id"], text), timeout=180)
        assert job["status"] == "ready", job
        assert job["backend"] == QWEN and job["synthesis_ms"] >= 0 and job["audio_seconds"] > 0
        _check_audio(qwen, key, job)
        jobs.append(job)
    for job in jobs:
        line = _completed(qwen, job["job_id"])
        assert line["backend"] == QWEN and line["synthesis_ms"] == job["synthesis_ms"]
        assert line["audio_seconds"] == job["audio_seconds"]
        assert line["rtf"] == pytest.approx(line["synthesis_ms"] / 1000 / line["audio_seconds"], rel=0.01, abs=1e-3)
        # Both jobs reused the prompt that the registration computed.
        assert line["details"]["prompt_cached"] is True and line["details"]["mode"] == mode, line


def test_jobs_submitted_together_run_as_one_batch(qwen: Client, key: dict, reference: bytes):
    voice = _profiled_voice(qwen, key, reference, "batched", ref_text=REFERENCE_TEXT)
    texts = [f"Batch member number {n} says a short line." for n in ("one", "two", "three", "four")]
    job_ids = [_synthesize(qwen, key, voice["voice_id"], t) for t in texts]
    for job_id in job_ids:
        job = qwen.wait_job(key, job_id, timeout=180)
        assert job["status"] == "ready", job
    batch_sizes = [_completed(qwen, j)["details"]["batch_size"] for j in job_ids]
    assert max(batch_sizes) > 1, batch_sizes
    batches = [r for r in _log_events(qwen, WORKER, "batch_synthesized") if r["backend"] == QWEN]
    assert max(r["batch_size"] for r in batches) > 1, batches


def test_a_backend_without_weights_is_refused_at_once(qwen: Client, key: dict, reference: bytes):
    voice = _profiled_voice(qwen, key, reference, "no 1.7b", ref_text=REFERENCE_TEXT)
    r = qwen.http.post("/v1/synthesize", headers=qwen.auth(key),
                       json={"voice_id": voice["voice_id"], "text": "Nobody runs me.", "backend": "qwen3-1.7b"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "backend_unavailable", r.text
    assert "qwen3-1.7b" in r.json()["error"]["message"]
    refused = qwen.create_voice(key, reference, name="big", backend="qwen3-1.7b")
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "backend_unavailable"
