"""The engine delivers each job of a batch when it is done, runs short and long texts in separate lanes,
and gives a batch the time its length calls for."""
from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from timbre_common.catalogue import expected_synthesis_seconds
from timbre_gpu_worker.backends.base import BackendError, SynthesisRequest, SynthesisResult
from timbre_gpu_worker.engine import Engine

OnResult = Callable[[int, SynthesisResult | BackendError], None]


class StagedBackend:
    """Delivers the first job of a batch at once, then holds the rest until `release` is set."""

    name = "staged"
    languages = frozenset({"en"})

    def __init__(self) -> None:
        self.release = threading.Event()
        self.finished_batches = 0

    def available(self) -> bool:
        return True

    def load(self) -> None:
        pass

    def profile_voice(self, voice_id: str, reference_wav: bytes, ref_text: str | None) -> dict:
        return {}

    def synthesize_batch(self, requests: Sequence[SynthesisRequest],
                         on_result: OnResult | None = None) -> list[SynthesisResult | BackendError]:
        results: list[SynthesisResult | BackendError] = [
            SynthesisResult(np.full(100, 0.1, dtype=np.float32), 1000, {"job": r.job_id}) for r in requests]
        assert on_result is not None
        on_result(0, results[0])
        self.release.wait(10)
        self.finished_batches += 1
        return results


def _req(job: str, text: str = "Some text.") -> SynthesisRequest:
    return SynthesisRequest(job_id=job, text=text, lang="en", voice_id="v")


async def test_first_job_of_a_batch_is_delivered_before_the_batch_ends() -> None:
    backend = StagedBackend()
    engine = Engine({"staged": backend}, max_batch=4, batch_window_ms=50)
    try:
        first = asyncio.create_task(engine.synthesize("staged", _req("a")))
        second = asyncio.create_task(engine.synthesize("staged", _req("b")))
        result = await asyncio.wait_for(first, 5)
        assert result.details == {"job": "a"}
        assert not second.done() and backend.finished_batches == 0
        backend.release.set()
        assert (await asyncio.wait_for(second, 5)).details == {"job": "b"}
    finally:
        backend.release.set()
        await engine.close()


async def test_an_overrunning_batch_fails_only_the_jobs_it_has_not_delivered() -> None:
    backend = StagedBackend()
    engine = Engine({"staged": backend}, max_batch=4, batch_window_ms=50, batch_timeout_s=0.5)
    try:
        done, late = await asyncio.gather(engine.synthesize("staged", _req("a")),
                                          engine.synthesize("staged", _req("b")), return_exceptions=True)
        assert isinstance(done, SynthesisResult) and done.details == {"job": "a"}
        # The job still running is failed as transient (not a BackendError): the transport retries it.
        assert isinstance(late, TimeoutError) and "1 of its jobs delivered" in str(late)
    finally:
        backend.release.set()
        await engine.close()


async def test_close_stops_a_loop_that_missed_its_cancel() -> None:
    """Python 3.11's wait_for drops a cancel that lands as its inner call ends; close() must not hang on it."""
    engine = Engine({})
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # as wait_for does when the result is already there
        await asyncio.sleep(3600)

    engine._loops.append(asyncio.create_task(stubborn()))
    await asyncio.sleep(0)
    await asyncio.wait_for(engine.close(), 5)
    assert swallowed.is_set() and engine._loops[0].cancelled()


def test_batch_time_follows_text_length_with_a_floor() -> None:
    engine = Engine({}, batch_timeout_s=10_000)
    short = [_req("a", "Hi.")]
    long_ = [_req("b", "x" * 3000), _req("c", "y" * 3000)]
    assert engine.batch_timeout_for("qwen3-1.7b", short) == expected_synthesis_seconds("qwen3-1.7b", 3)
    assert engine.batch_timeout_for("qwen3-1.7b", long_) == expected_synthesis_seconds("qwen3-1.7b", 6000)
    assert engine.batch_timeout_for("qwen3-1.7b", long_) > engine.batch_timeout_for("qwen3-1.7b", short)
    # The configured cap still bounds any batch.
    assert Engine({}, batch_timeout_s=100).batch_timeout_for("qwen3-1.7b", long_) == 100


def test_lanes_only_for_backends_that_run_batches_side_by_side() -> None:
    class Plain(StagedBackend):
        pass

    class Laned(StagedBackend):
        concurrent_lanes = True

    engine = Engine({"plain": Plain(), "laned": Laned()}, short_lane_chars=20)
    assert engine.lane("plain", _req("a", "x" * 500)) == "all"
    assert engine.lane("laned", _req("a", "x" * 20)) == "short"
    assert engine.lane("laned", _req("a", "x" * 21)) == "long"


_QWEN = importlib.util.find_spec("qwen_tts") is not None and importlib.util.find_spec("torch") is not None


@pytest.mark.skipif(not _QWEN, reason="the qwen stack is installed from requirements/qwen*.txt")
@pytest.mark.timeout(480)  # a stuck generation fails the test instead of holding the suite
async def test_short_job_finishes_while_a_long_one_runs(tmp_path_factory: pytest.TempPathFactory) -> None:
    import io

    import soundfile as sf

    from timbre_common.testing import load_module
    from timbre_gpu_worker.backends.qwen3 import Qwen3Backend

    tiny = load_module("timbre_qwen_tiny", Path(__file__).resolve().parents[1] / "qwen_tiny.py")
    model_dir = tiny.build_tiny_model(tmp_path_factory.mktemp("qwen3-tiny"))
    backend = Qwen3Backend("qwen3-0.6b", model_dir, device="cpu", min_new_tokens=4, tokens_per_char=1.2)
    backend.load()
    sr = 16000
    t = np.arange(int(sr * 1.5)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")

    def req(job: str, text: str) -> SynthesisRequest:
        return SynthesisRequest(job_id=job, text=text, lang="en", voice_id="v", reference_wav=buf.getvalue())

    backend.profile_voice("v", buf.getvalue(), None)  # the prompt is ready: both jobs only generate
    engine = Engine({"qwen3-0.6b": backend}, batch_window_ms=5, short_lane_chars=40)
    long_text = "A long passage that keeps the model busy for many codec frames, well past the short one."
    try:
        long_job = asyncio.create_task(engine.synthesize("qwen3-0.6b", req("long", long_text)))
        started = asyncio.get_running_loop().time()
        while backend.generate_calls == 0:  # the long batch is generating
            if long_job.done():
                long_job.result()  # it failed before generating: show why
            assert asyncio.get_running_loop().time() - started < 120, "the long job never started generating"
            await asyncio.sleep(0.01)
        short = await asyncio.wait_for(engine.synthesize("qwen3-0.6b", req("short", "Hi there.")), 120)
        assert not long_job.done(), "the short job waited for the long batch"
        assert short.samples.size > 0
        long_result = await asyncio.wait_for(long_job, 300)
        assert long_result.samples.size > short.samples.size
    finally:
        await engine.close()
