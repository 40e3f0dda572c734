"""The worker's bus transport and engine with a fake backend: batching, final and transient failures."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest

from timbre_common.audio import decode_wav, parse_wav
from timbre_common.contracts.synthesis import (
    JobOwner,
    LookupJob,
    SynthesisCompleted,
    SynthesisFailed,
    SynthesisRequested,
)
from timbre_common.messaging import RemoteError, RpcTimeout
from timbre_common.testing import FakeBus, envelope
from timbre_gpu_worker import handlers
from timbre_gpu_worker.backends.base import BackendError, SynthesisRequest, SynthesisResult
from timbre_gpu_worker.engine import Engine

SAMPLE_RATE = 16000
REFERENCE = b"RIFF" + bytes(2000)
CREATED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class FakeBackend:
    """A backend that answers a tenth of a second of tone per character and records every batch.

    `fail_texts` become per-request BackendErrors; `raise_on_batch` makes the whole batch call raise.
    """

    name = "fake"
    languages = frozenset({"en"})

    def __init__(self, *, fail_texts: frozenset[str] = frozenset(), raise_on_batch: Exception | None = None,
                 seconds_per_batch: float = 0.0) -> None:
        self.batches: list[list[SynthesisRequest]] = []
        self.fail_texts = fail_texts
        self.raise_on_batch = raise_on_batch
        self.seconds_per_batch = seconds_per_batch
        self.threads: set[str] = set()

    def available(self) -> bool:
        return True

    def load(self) -> None:
        pass

    def profile_voice(self, voice_id: str, reference_wav: bytes, ref_text: str | None) -> dict:
        return {}

    def synthesize_batch(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult | BackendError]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(requests))
        if self.seconds_per_batch:
            threading.Event().wait(self.seconds_per_batch)  # a model's wall time; we are in a worker thread
        if self.raise_on_batch is not None:
            raise self.raise_on_batch
        out: list[SynthesisResult | BackendError] = []
        for request in requests:
            if request.text in self.fail_texts:
                out.append(BackendError("unsupported_text", f"cannot say {request.text!r}"))
                continue
            frames = int(0.1 * SAMPLE_RATE * len(request.text))
            tone = (0.25 * np.sin(2 * np.pi * 220 * np.arange(frames) / SAMPLE_RATE)).astype(np.float32)
            out.append(SynthesisResult(tone, SAMPLE_RATE, details={"job": request.job_id}))
        return out


class Reference:
    """A storage server behind presigned URLs, as an httpx MockTransport; counts requests per path."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.fail_next: list[Exception | int] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if self.fail_next:
            failure = self.fail_next.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return httpx.Response(failure)
        if request.url.path == "/ref.wav":
            return httpx.Response(200, content=REFERENCE)
        if request.url.path == "/forbidden.wav":
            return httpx.Response(403)
        if request.url.path == "/expired.wav":
            return httpx.Response(410)
        return httpx.Response(404)


@pytest.fixture
def storage() -> Reference:
    return Reference()


@pytest.fixture
async def http(storage: Reference) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(storage)) as client:
        yield client


@pytest.fixture
async def backend() -> FakeBackend:
    return FakeBackend(fail_texts=frozenset({"unsayable"}))


@pytest.fixture
async def engine(backend: FakeBackend) -> AsyncIterator[Engine]:
    engine = Engine({"fake": backend}, max_batch=8, batch_window_ms=40)
    yield engine
    await engine.close()


def order(job: str = "j1", *, text: str = "Hello", backend: str = "fake", attempt: int = 1,
          reference_url: str | None = None) -> SynthesisRequested:
    return SynthesisRequested(job_id=job, account_id="acc-1", voice_id="v-1", text=text, lang="en",
                              backend=backend, attempt=attempt, cache_key="k", job_created_at=CREATED,
                              reference_url=reference_url, ref_text="Reference words.",
                              voice_profile={"nearest": "joe"})


def dispatcher_bus(jobs: dict[str, tuple[str, int]] | None = None) -> FakeBus:
    """A bus whose dispatcher says each job is pending at attempt 1, unless `jobs` says (status, attempts)."""
    bus = FakeBus()

    async def lookup(cmd: LookupJob, body: bytes | None) -> JobOwner:
        status, attempts = (jobs or {}).get(cmd.job_id, ("pending", 1))
        return JobOwner(job_id=cmd.job_id, account_id="acc-1", voice_id="v-1", backend="fake", status=status,
                        created_at=CREATED, attempts=attempts)

    bus.on(LookupJob, lookup)
    return bus


async def handle(o: SynthesisRequested, *, engine: Engine, bus: FakeBus, http: httpx.AsyncClient,
                 max_reference_bytes: int = 1_000_000) -> None:
    await handlers.on_synthesis_requested(o, envelope=envelope(), engine=engine, bus=bus, http=http,
                                          max_reference_bytes=max_reference_bytes)


# Batching -------------------------------------------------------------------------------------------------

async def test_concurrent_requests_for_one_backend_run_as_one_batch_in_a_thread(engine: Engine,
                                                                             backend: FakeBackend) -> None:
    requests = [SynthesisRequest(f"j{i}", text="x" * (i + 1), lang="en", voice_id="v") for i in range(5)]
    results = await asyncio.gather(*(engine.synthesize("fake", r) for r in requests))
    assert [len(b) for b in backend.batches] == [5] and engine.batches_run == 1
    # Each caller gets its own result back, in spite of sharing the batch.
    assert [r.details["job"] for r in results] == [f"j{i}" for i in range(5)]
    assert [r.audio_seconds for r in results] == pytest.approx([0.1 * (i + 1) for i in range(5)])
    assert threading.main_thread().name not in backend.threads  # the event loop never runs the model


async def test_a_batch_holds_at_most_max_batch_requests() -> None:
    backend = FakeBackend()
    engine = Engine({"fake": backend}, max_batch=2, batch_window_ms=40)
    try:
        requests = [SynthesisRequest(job_id=f"j{i}", text="ab", lang="en", voice_id="v") for i in range(5)]
        await asyncio.gather(*(engine.synthesize("fake", r) for r in requests))
    finally:
        await engine.close()
    assert [len(b) for b in backend.batches] == [2, 2, 1]
    assert [r.job_id for b in backend.batches for r in b] == [f"j{i}" for i in range(5)]


async def test_requests_that_arrive_during_a_batch_form_the_next_one() -> None:
    backend = FakeBackend(seconds_per_batch=0.1)
    engine = Engine({"fake": backend}, max_batch=8, batch_window_ms=10)
    try:
        first = asyncio.create_task(engine.synthesize("fake", SynthesisRequest("a", "ab", "en", "v")))
        for _ in range(400):  # bounded poll until the first batch is running in its thread
            if backend.batches:
                break
            await asyncio.sleep(0.005)
        later = [engine.synthesize("fake", SynthesisRequest(f"b{i}", "ab", "en", "v")) for i in range(3)]
        await asyncio.gather(first, *later)
    finally:
        await engine.close()
    assert [[r.job_id for r in b] for b in backend.batches] == [["a"], ["b0", "b1", "b2"]]


async def test_concurrent_orders_through_the_transport_share_one_batch(engine: Engine, backend: FakeBackend,
                                                                       http: httpx.AsyncClient,
                                                                       storage: Reference) -> None:
    bus = dispatcher_bus()
    orders = [order(f"j{i}", text="Hello" * (i + 1), reference_url="http://store/ref.wav") for i in range(3)]
    await asyncio.gather(*(handle(o, engine=engine, bus=bus, http=http) for o in orders))
    assert [len(b) for b in backend.batches] == [3]
    assert sorted(e.job_id for e in bus.events(SynthesisCompleted)) == ["j0", "j1", "j2"]
    assert storage.requests == ["/ref.wav"] * 3
    # The backend got what the order carried: the reference bytes, its transcript and the voice's profile.
    request = backend.batches[0][0]
    assert request.reference_wav == REFERENCE and request.ref_text == "Reference words."
    assert request.voice_profile == {"nearest": "joe"}


# Results --------------------------------------------------------------------------------------------------

async def test_a_completion_carries_its_timings_and_the_wav_body(engine: Engine,
                                                                 http: httpx.AsyncClient) -> None:
    bus = dispatcher_bus()
    await handle(order("j1", text="Hello there", attempt=2), engine=engine, bus=bus, http=http)
    [(done, body, message_id)] = bus.published
    assert isinstance(done, SynthesisCompleted) and message_id == "j1:2:completed"
    assert (done.job_id, done.account_id, done.voice_id, done.backend) == ("j1", "acc-1", "v-1", "fake")
    assert done.sample_rate == SAMPLE_RATE and done.audio_seconds == pytest.approx(1.1)
    assert done.job_created_at == CREATED and done.details == {"job": "j1"}
    # The batch window alone is 40 ms: the timing is real, and the RTF is derived from it.
    assert done.synthesis_ms >= 40
    assert done.rtf == pytest.approx(done.synthesis_ms / 1000 / done.audio_seconds, abs=1e-4)
    info = parse_wav(body)
    assert (info.sample_rate, info.channels) == (SAMPLE_RATE, 1)
    assert info.duration_s == pytest.approx(1.1)
    samples, _ = decode_wav(body)
    assert float(np.abs(samples).max()) == pytest.approx(0.25, abs=0.01)


# Final failures -------------------------------------------------------------------------------------------

async def test_a_backend_error_for_one_request_fails_only_that_job_without_retry(
        engine: Engine, backend: FakeBackend, http: httpx.AsyncClient) -> None:
    bus = dispatcher_bus()
    await asyncio.gather(handle(order("ok"), engine=engine, bus=bus, http=http),
                         handle(order("bad", text="unsayable"), engine=engine, bus=bus, http=http))
    assert [len(b) for b in backend.batches] == [2]
    [failed] = bus.events(SynthesisFailed)
    assert (failed.job_id, failed.code, failed.retryable) == ("bad", "unsupported_text", False)
    assert "unsayable" in failed.reason
    assert [e.job_id for e in bus.events(SynthesisCompleted)] == ["ok"]
    assert [mid for e, _, mid in bus.published if isinstance(e, SynthesisFailed)] == ["bad:1:failed"]


async def test_a_backend_error_raised_for_the_whole_batch_fails_every_job_in_it(
        http: httpx.AsyncClient) -> None:
    backend = FakeBackend(raise_on_batch=BackendError("unsupported_language", "no such language"))
    engine = Engine({"fake": backend}, batch_window_ms=40)
    bus = dispatcher_bus()
    try:
        await asyncio.gather(*(handle(order(f"j{i}"), engine=engine, bus=bus, http=http) for i in range(3)))
    finally:
        await engine.close()
    failed = bus.events(SynthesisFailed)
    assert sorted(e.job_id for e in failed) == ["j0", "j1", "j2"]
    assert {(e.code, e.retryable) for e in failed} == {("unsupported_language", False)}


async def test_an_unknown_backend_fails_at_once_with_a_clear_reason(engine: Engine, backend: FakeBackend,
                                                                   http: httpx.AsyncClient,
                                                                   storage: Reference) -> None:
    bus = dispatcher_bus()
    await handle(order(backend="qwen3-1.7b", reference_url="http://store/ref.wav"), engine=engine, bus=bus,
                 http=http)
    [failed] = bus.events(SynthesisFailed)
    assert failed.code == "backend_unavailable" and not failed.retryable
    assert failed.reason == "backend qwen3-1.7b is not available on this worker"
    assert storage.requests == [] and backend.batches == []  # no download, no model call


@pytest.mark.parametrize(("path", "status"),
                         [("/gone.wav", 404), ("/forbidden.wav", 403), ("/expired.wav", 410)])
async def test_a_reference_that_storage_no_longer_serves_is_a_final_failure(
        engine: Engine, backend: FakeBackend, http: httpx.AsyncClient, path: str, status: int) -> None:
    bus = dispatcher_bus()
    await handle(order(reference_url=f"http://store{path}"), engine=engine, bus=bus, http=http)
    [failed] = bus.events(SynthesisFailed)
    assert failed.code == "reference_missing" and not failed.retryable and str(status) in failed.reason
    assert backend.batches == []


async def test_a_reference_over_the_limit_is_a_final_failure(engine: Engine, http: httpx.AsyncClient) -> None:
    bus = dispatcher_bus()
    await handle(order(reference_url="http://store/ref.wav"), engine=engine, bus=bus, http=http,
                 max_reference_bytes=len(REFERENCE) - 1)
    [failed] = bus.events(SynthesisFailed)
    assert failed.code == "reference_too_large" and not failed.retryable


# Transient failures: raised, so the consumer retries with back-off ------------------------------------------

@pytest.mark.parametrize("failure", [503, 500, 429, httpx.ConnectError("connection refused"),
                                     httpx.ReadTimeout("storage too slow")])
async def test_a_transient_reference_fetch_error_is_raised_for_retry(
        engine: Engine, backend: FakeBackend, http: httpx.AsyncClient, storage: Reference,
        failure: Exception | int) -> None:
    bus = dispatcher_bus()
    storage.fail_next = [failure]
    with pytest.raises(httpx.HTTPError):
        await handle(order(reference_url="http://store/ref.wav"), engine=engine, bus=bus, http=http)
    assert bus.published == [] and backend.batches == []
    # The redelivery succeeds once storage is back.
    await handle(order(reference_url="http://store/ref.wav"), engine=engine, bus=bus, http=http)
    assert [e.job_id for e in bus.events(SynthesisCompleted)] == ["j1"]


async def test_an_unexpected_model_crash_is_raised_for_retry_not_reported_as_final(
        http: httpx.AsyncClient) -> None:
    backend = FakeBackend(raise_on_batch=RuntimeError("CUDA out of memory"))
    engine = Engine({"fake": backend}, batch_window_ms=10)
    bus = dispatcher_bus()
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            await handle(order(), engine=engine, bus=bus, http=http)
        # The batch loop survives the crash: the next job still runs.
        backend.raise_on_batch = None
        await handle(order("j2"), engine=engine, bus=bus, http=http)
    finally:
        await engine.close()
    assert bus.events(SynthesisFailed) == []
    assert [e.job_id for e in bus.events(SynthesisCompleted)] == ["j2"]


async def test_a_backend_returning_too_few_results_fails_the_batch_and_the_loop_lives_on(
        http: httpx.AsyncClient) -> None:
    class ShortBackend(FakeBackend):
        short = True

        def synthesize_batch(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult | BackendError]:
            out = super().synthesize_batch(requests)
            return out[:-1] if self.short else out

    backend = ShortBackend()
    engine = Engine({"fake": backend}, batch_window_ms=10)
    bus = dispatcher_bus()
    try:
        with pytest.raises(RuntimeError, match="returned 0 results"):
            await asyncio.wait_for(handle(order(), engine=engine, bus=bus, http=http), 5)
        backend.short = False
        await asyncio.wait_for(handle(order("j2"), engine=engine, bus=bus, http=http), 5)
    finally:
        await engine.close()
    assert [e.job_id for e in bus.events(SynthesisCompleted)] == ["j2"]


async def test_a_batch_that_never_returns_times_out_and_is_retried(http: httpx.AsyncClient) -> None:
    backend = FakeBackend(seconds_per_batch=2.0)
    engine = Engine({"fake": backend}, batch_window_ms=10, batch_timeout_s=0.3)
    try:
        with pytest.raises(TimeoutError, match="longer than"):
            await asyncio.wait_for(handle(order(), engine=engine, bus=dispatcher_bus(), http=http), 5)
    finally:
        await engine.close()


# Superseded work orders ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("job", "state"), [("old-attempt", ("pending", 2)), ("done", ("ready", 1)),
                                            ("dead", ("failed", 1))])
async def test_a_superseded_work_order_is_acknowledged_without_synthesis(engine: Engine, backend: FakeBackend,
                                                                         http: httpx.AsyncClient, job: str,
                                                                         state: tuple[str, int]) -> None:
    # A re-sent job's older attempt, or a job that already ended, costs no synthesis and reports nothing.
    bus = dispatcher_bus({job: state})
    await handle(order(job, attempt=1), engine=engine, bus=bus, http=http)
    assert backend.batches == [] and bus.published == []


async def test_a_work_order_of_a_deleted_job_is_dropped(engine: Engine, backend: FakeBackend,
                                                        http: httpx.AsyncClient) -> None:
    bus = FakeBus()

    async def gone(cmd: LookupJob, body: bytes | None) -> None:
        raise RemoteError("job_not_found", "job gone", status=404)

    bus.on(LookupJob, gone)
    await handle(order("deleted"), engine=engine, bus=bus, http=http)
    assert backend.batches == [] and bus.published == []


async def test_the_current_attempt_runs_and_an_unanswered_check_does_not_block_work(
        engine: Engine, backend: FakeBackend, http: httpx.AsyncClient) -> None:
    bus = dispatcher_bus({"j2": ("pending", 2)})
    await handle(order("j2", attempt=2), engine=engine, bus=bus, http=http)
    assert [e.job_id for e in bus.events(SynthesisCompleted)] == ["j2"]

    silent = FakeBus()

    async def timeout(cmd: LookupJob, body: bytes | None) -> None:
        raise RpcTimeout("dispatcher did not answer")

    silent.on(LookupJob, timeout)
    await handle(order("j3"), engine=engine, bus=silent, http=http)
    assert [e.job_id for e in silent.events(SynthesisCompleted)] == ["j3"]
