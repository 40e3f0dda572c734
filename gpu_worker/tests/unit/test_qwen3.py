"""Qwen3Backend through the real qwen-tts loading and generation code, on a tiny random-weight model."""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("torch", reason="the qwen stack is installed from requirements/qwen*.txt")
pytest.importorskip("transformers", reason="the qwen stack is installed from requirements/qwen*.txt")
if importlib.util.find_spec("qwen_tts") is None:
    pytest.skip("qwen-tts not installed (requirements/qwen-nodeps.txt)", allow_module_level=True)

from timbre_common.testing import load_module
from timbre_gpu_worker.backends.base import BackendError, BackendUnavailable, SynthesisRequest  # noqa: E402
from timbre_gpu_worker.backends.qwen3 import SAMPLES_PER_TOKEN, Qwen3Backend  # noqa: E402

_TINY = Path(__file__).resolve().parents[1] / "qwen_tiny.py"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return load_module("timbre_qwen_tiny", _TINY).build_tiny_model(tmp_path_factory.mktemp("qwen3-tiny"))


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Qwen3Backend:
    import torch

    torch.manual_seed(0)
    b = Qwen3Backend("qwen3-0.6b", tiny_model_dir, device="cpu", min_new_tokens=8, tokens_per_char=0.5)
    b.load()
    return b


def _reference_wav(seed: int, sr: int = 16000, seconds: float = 1.5) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    tone = 0.2 * np.sin(2 * np.pi * (150 + 40 * seed) * t) + 0.02 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, tone.astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _req(job: str, text: str, voice: str = "v1", ref_text: str | None = None, lang: str = "en",
         seed: int = 1) -> SynthesisRequest:
    return SynthesisRequest(job_id=job, text=text, lang=lang, voice_id=voice, reference_wav=_reference_wav(seed),
                            ref_text=ref_text)


def _assert_audio(result, backend: Qwen3Backend, text: str, lang: str = "en") -> None:
    assert not isinstance(result, BackendError), result
    assert result.sample_rate == 24000
    assert result.samples.ndim == 1 and result.samples.dtype == np.float32
    assert result.samples.size > 0
    assert np.all(np.isfinite(result.samples))
    assert float(np.sqrt(np.mean(result.samples**2))) > 1e-4, "silence is not audio"
    bound = backend.max_new_tokens_for(text, lang) * SAMPLES_PER_TOKEN
    assert result.samples.size <= bound


def test_available_false_without_weights(tmp_path: Path) -> None:
    assert not Qwen3Backend("qwen3-1.7b", None).available()
    assert not Qwen3Backend("qwen3-1.7b", tmp_path / "missing").available()
    (tmp_path / "config.json").write_text("{}")
    partial = Qwen3Backend("qwen3-1.7b", tmp_path)
    assert not partial.available()
    with pytest.raises(BackendUnavailable):
        partial.load()


def test_tiny_dir_is_available_and_cpu_float32(backend: Qwen3Backend) -> None:
    import torch

    assert backend.available()
    assert backend.resolved_dtype() == torch.float32
    assert next(backend.model.model.parameters()).dtype == torch.float32


def test_xvector_mode(backend: Qwen3Backend) -> None:
    text = "Hello from the x-vector path."
    [result] = backend.synthesize_batch([_req("j1", text, voice="xv")])
    _assert_audio(result, backend, text)
    assert result.details["mode"] == "xvector"
    assert result.details["chunks"] == 1


def test_in_context_mode(backend: Qwen3Backend) -> None:
    text = "Hello from the in-context path."
    [result] = backend.synthesize_batch([_req("j2", text, voice="icl", ref_text="A short reference line.")])
    _assert_audio(result, backend, text)
    assert result.details["mode"] == "icl"


def test_batch_of_three_in_one_call(backend: Qwen3Backend) -> None:
    texts = ["One short line.", "A second, slightly longer line.", "Third."]
    before = backend.generate_calls
    reqs = [_req(f"b{i}", t, voice=f"bv{i}", seed=i + 3) for i, t in enumerate(texts)]
    results = backend.synthesize_batch(reqs)
    assert backend.generate_calls - before == 1
    for text, result in zip(texts, results, strict=True):
        _assert_audio(result, backend, text)
        assert result.details["batch_size"] == 3


def test_prompt_reused_across_batches(backend: Qwen3Backend) -> None:
    hits, misses = backend.prompt_cache_hits, backend.prompt_cache_misses
    [first] = backend.synthesize_batch([_req("r1", "First job.", voice="reuse", seed=9)])
    [second] = backend.synthesize_batch([_req("r2", "Second job.", voice="reuse", seed=9)])
    assert backend.prompt_cache_misses - misses == 1
    assert backend.prompt_cache_hits - hits == 1
    assert first.details["prompt_cached"] is False and second.details["prompt_cached"] is True
    # A new reference for the same voice is a new prompt, not a stale hit.
    [third] = backend.synthesize_batch([_req("r3", "Third job.", voice="reuse", seed=10)])
    assert third.details["prompt_cached"] is False


def test_profile_voice_warms_cache(backend: Qwen3Backend) -> None:
    summary = backend.profile_voice("pv", _reference_wav(11), "Reference words.")
    assert summary["mode"] == "icl" and summary["ref_frames"] > 0
    [result] = backend.synthesize_batch([_req("p1", "Uses the profile.", voice="pv", seed=11,
                                              ref_text="Reference words.")])
    assert result.details["prompt_cached"] is True


def test_long_text_is_chunked_and_joined(tiny_model_dir: Path) -> None:
    b = Qwen3Backend("qwen3-0.6b", tiny_model_dir, device="cpu", max_chunk_chars=40, min_new_tokens=6,
                     tokens_per_char=0.3)
    text = "The first sentence is here. The second one follows it. And a third closes the text."
    [result] = b.synthesize_batch([_req("long", text)])
    assert not isinstance(result, BackendError), result
    assert result.details["chunks"] == 3
    assert b.generate_calls == 1  # the three chunks went through one batched call
    assert result.samples.size > 0 and np.all(np.isfinite(result.samples))


def test_unsupported_language_fails_only_that_request(backend: Qwen3Backend) -> None:
    results = backend.synthesize_batch([_req("ok", "Fine text."), _req("bad", "Texte.", lang="xx")])
    _assert_audio(results[0], backend, "Fine text.")
    assert isinstance(results[1], BackendError) and results[1].code == "unsupported_language"


def test_bad_reference_fails_only_that_request(backend: Qwen3Backend) -> None:
    bad = SynthesisRequest(job_id="x", text="Hi.", lang="en", voice_id="broken", reference_wav=b"not a wav")
    results = backend.synthesize_batch([bad, _req("ok2", "Still fine.")])
    assert isinstance(results[0], BackendError) and results[0].code == "invalid_reference"
    _assert_audio(results[1], backend, "Still fine.")
