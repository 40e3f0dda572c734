"""Metrics and traces of the running platform: every service's /metrics moves with a synthesis, and one
synthesis is one trace across gateway, dispatcher, worker and storage."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Client, running_platform
from timbre_common.catalogue import SYSTEM_VOICES

pytestmark = pytest.mark.e2e

JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")
SERVICES = ("gateway", "voices", "dispatcher", "storage", "billing", "gpu_worker")


@pytest.fixture(scope="module")
def observed(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """A platform whose services write their spans to one file each and poll queue depths every second."""
    root = tmp_path_factory.mktemp("observed")
    overrides = {"OTEL_TRACES_EXPORTER": "file", "TRACES_FILE": str(root / "traces" / "{service}.jsonl"),
                 "QUEUE_POLL_INTERVAL_S": "1", "HOLD_STATS_INTERVAL_S": "1"}
    (root / "traces").mkdir()
    with running_platform(database_url, amqp_url, root, overrides=overrides) as client:
        client.env["TRACES_DIR"] = str(root / "traces")
        yield client


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


def total(scrape: dict, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in scrape.items() if n == name and wanted <= ls)


def test_every_service_metrics_move_with_a_synthesis(observed: Client):
    before = {s: observed.scrape(s) for s in SERVICES}
    # Each backend's series exist from the start, so the first job already shows in rate() and increase().
    assert ("timbre_synthesis_audio_seconds_total", frozenset({("backend", "embedded")})) in before["gpu_worker"]
    assert ("timbre_jobs_finished_total", frozenset({("backend", "qwen3-1.7b"), ("outcome", "failed")})) \
        in before["dispatcher"]
    key = observed.new_key()
    body = {"voice_id": JOE.voice_id, "text": "Metrics are counted while this sentence is spoken."}
    miss = observed.http.post("/v1/synthesize", json=body, headers=observed.auth(key))
    assert miss.status_code == 202, miss.text
    observed.wait_job(key, miss.json()["job_id"], until=("ready",))
    hit = observed.http.post("/v1/synthesize", json=body, headers=observed.auth(key))
    assert hit.status_code == 200 and hit.headers["X-Cache"] == "HIT"
    after = {s: observed.scrape(s) for s in SERVICES}

    def moved(service: str, name: str, by: float = 1, **labels: str) -> None:
        old, new = total(before[service], name, **labels), total(after[service], name, **labels)
        assert new >= old + by, f"{service} {name}{labels}: {old} -> {new}"

    # Gateway: requests per route template and status, RPC latency per target.
    moved("gateway", "timbre_http_requests_total", method="POST", route="/v1/synthesize", status="202")
    moved("gateway", "timbre_http_requests_total", method="POST", route="/v1/synthesize", status="200")
    moved("gateway", "timbre_http_requests_total", method="GET", route="/v1/jobs/{job_id}")
    # The miss asks the dispatcher; the hit is answered by the gateway's read models (or, when the job.ready
    # event has not reached them yet, by the dispatcher): either way one cache hit is counted.
    moved("gateway", "timbre_rpc_client_duration_seconds_count", 1, target="dispatcher", command="dispatch.submit",
          outcome="ok")
    moved("gateway", "timbre_rpc_client_duration_seconds_count", 1, target="voices", command="voices.get")
    assert not any(n == "timbre_http_requests_total" and ("route", f"/v1/jobs/{miss.json()['job_id']}") in ls
                   for n, ls in after["gateway"]), "a raw path became a label"
    # Dispatcher: commands served, a miss then a hit, one job ready with its latency, audio.stored handled.
    moved("dispatcher", "timbre_rpc_server_duration_seconds_count", 1, command="dispatch.submit", outcome="ok")
    moved("dispatcher", "timbre_synthesis_cache_lookups_total", backend="embedded", result="miss")
    hits = sum(total(after[s], "timbre_synthesis_cache_lookups_total", backend="embedded", result="hit")
               - total(before[s], "timbre_synthesis_cache_lookups_total", backend="embedded", result="hit")
               for s in ("gateway", "dispatcher"))
    assert hits == 1, hits
    moved("dispatcher", "timbre_jobs_finished_total", backend="embedded", outcome="ready")
    moved("dispatcher", "timbre_job_duration_seconds_count", backend="embedded")
    moved("dispatcher", "timbre_messages_handled_total", queue="dispatcher.events", type="audio.stored")
    # Worker: one synthesis, its audio and wall seconds (their ratio is x real time).
    moved("gpu_worker", "timbre_syntheses_total", backend="embedded", outcome="completed")
    moved("gpu_worker", "timbre_messages_handled_total", queue="gpu_worker.synthesis.embedded")
    moved("gpu_worker", "timbre_synthesis_audio_seconds_total", 1.0, backend="embedded")
    assert value(after["gpu_worker"], "timbre_synthesis_wall_seconds_total", backend="embedded") > 0
    # Storage stored the audio; voices answered; billing counted the job.
    moved("storage", "timbre_messages_handled_total", queue="storage.events", type="synthesis.completed")
    moved("voices", "timbre_rpc_server_duration_seconds_count", 1, command="voices.get", outcome="ok")
    moved("billing", "timbre_rpc_server_duration_seconds_count", 1, command="billing.check_quota")
    moved("billing", "timbre_messages_handled_total", queue="billing.events", type="job.ready")


def test_gateway_reports_queues_and_backends_and_guards_its_metrics(observed: Client):
    deadline = time.monotonic() + 30
    while True:  # the queue poll runs every second on this platform
        scrape = observed.scrape("gateway")
        if value(scrape, "timbre_queue_consumers", queue="gpu_worker.synthesis.embedded") >= 1:
            break
        assert time.monotonic() < deadline, "no consumer gauge for the embedded work queue"
        time.sleep(0.5)
    assert ("timbre_dead_letter_messages", frozenset({("queue", "storage.events")})) in scrape
    assert value(scrape, "timbre_backend_available", backend="embedded") == 1
    assert value(scrape, "timbre_backend_available", backend="qwen3-1.7b") == 0
    assert observed.scrape("billing")[("timbre_quota_holds_active", frozenset())] == 0
    refused = httpx.get(observed.metrics_urls["gateway"])
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_admin_secret"
    wrong = httpx.get(observed.metrics_urls["gateway"], headers={"Authorization": "Bearer tb_not_the_admin"})
    assert wrong.status_code == 401


def _spans(directory: Path) -> list[dict]:
    spans = []
    for path in directory.glob("*.jsonl"):
        spans += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return spans


def test_one_synthesis_is_one_trace_across_the_services(observed: Client):
    key = observed.new_key()
    r = observed.http.post("/v1/synthesize", headers=observed.auth(key),
                           json={"voice_id": JOE.voice_id, "text": "One trace follows this sentence everywhere."})
    assert r.status_code == 202, r.text
    job_id, request_id = r.json()["job_id"], r.headers["X-Request-Id"]
    observed.wait_job(key, job_id, until=("ready",))
    traces = Path(observed.env["TRACES_DIR"])

    deadline = time.monotonic() + 30
    while True:
        spans = _spans(traces)
        roots = [s for s in spans if s["name"] == "POST /v1/synthesize"
                 and s["attributes"].get("timbre.correlation_id") == request_id]
        trace = [s for s in spans if roots and s["trace_id"] == roots[0]["trace_id"]]
        ids = {s["span_id"] for s in trace}
        services = {s["service"] for s in trace}
        # Complete: the four services in it, and every span's parent written too (billing's job.ready last).
        complete = {"gateway", "dispatcher", "gpu_worker", "storage", "billing"} <= services and all(
            s["parent_span_id"] in ids for s in trace if s is not roots[0])
        if complete or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert len(roots) == 1, f"no gateway span for request {request_id}"
    root = roots[0]
    assert root["parent_span_id"] is None and root["kind"] == "server" and root["service"] == "gateway"
    assert {"gateway", "dispatcher", "gpu_worker", "storage", "billing"} <= services, services
    orphans = [s["name"] for s in trace if s is not root and s["parent_span_id"] not in ids]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"
    names = {(s["service"], s["name"]) for s in trace}
    for expected in [("gateway", "dispatcher dispatch.submit"), ("dispatcher", "dispatcher dispatch.submit"),
                     ("dispatcher", "synthesis.requested.v1.embedded publish"),
                     ("gpu_worker", "gpu_worker.synthesis.embedded process"), ("gpu_worker", "synthesize"),
                     ("storage", "storage.events process"), ("dispatcher", "dispatcher.events process"),
                     ("billing", "billing.events process")]:
        assert expected in names, f"{expected} missing from {sorted(names)}"
    # The worker's span hangs, through the bus, under the gateway's request.
    by_id = {s["span_id"]: s for s in trace}
    worker = next(s for s in trace if s["name"] == "gpu_worker.synthesis.embedded process")
    chain, span = [], worker
    while span is not None:
        chain.append(span["service"])
        span = by_id.get(span["parent_span_id"])
    assert chain[-1] == "gateway" and "dispatcher" in chain
    # The logs of the same request carry the same trace id next to the correlation id.
    worker_log = [json.loads(line) for line in observed.platform.log("gpu_worker").splitlines()
                  if line.startswith("{") and job_id in line and '"synthesis_completed"' in line]
    assert worker_log and worker_log[0]["trace_id"] == root["trace_id"]
    assert worker_log[0]["correlation_id"] == request_id
