"""Qwen3Backend through the real qwen-tts loading and generation code, on a tiny random-weight model."""
from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("torch", reason="the qwen stack is installed from requirements/qwen*.txt")
pytest.importorskip("transformers", reason="the qwen stack is installed from requirements/qwen*.txt")
if importlib.util.find_spec("qwen_tts") is None:
    pytest.skip("qwen-tts not installed (requirements/qwen-nodeps.txt)", allow_module_level=True)

from timbre_common.testing import load_module
from timbre_gpu_worker.backends.base import (  # noqa: E402
    BackendError,
    BackendUnavailable,
    SynthesisRequest,
    SynthesisResult,
)
from timbre_gpu_worker.backends.qwen3 import (  # noqa: E402
    SAMPLE_RATE,
    SAMPLES_PER_TOKEN,
    Qwen3Backend,
    prepare_reference,
)

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
    # CPU runs the reference decode and never imports the CUDA-only graph code.
    assert backend.decode_path == "reference"
    assert "timbre_gpu_worker.backends.qwen3_cuda" not in sys.modules
    assert "faster_qwen3_tts" not in sys.modules
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


def test_truncation_is_flagged_not_silent(backend: Qwen3Backend) -> None:
    # Random weights almost never say end-of-speech, so the chunk runs into its frame bound: the job says so.
    [result] = backend.synthesize_batch([_req("t1", "A sentence that runs to its bound.")])
    assert not isinstance(result, BackendError), result
    assert result.details["truncated"] is True and result.details["truncated_chunks"] == [0]
    assert result.details["decode"] == "reference"


def test_reference_is_trimmed_capped_and_padded() -> None:
    sr = SAMPLE_RATE
    rng = np.random.default_rng(3)
    speech = (0.3 * rng.standard_normal(sr * 15)).astype(np.float32)
    speech[sr * 9 : sr * 9 + sr // 5] = 0.0  # a pause at 9 s, inside the last two seconds before the cap
    mono = np.concatenate([np.zeros(sr), speech, np.zeros(2 * sr)]).astype(np.float32)
    out, info = prepare_reference(mono, sr, max_seconds=10.0, tail_silence_s=0.4)
    assert info["capped"] is True
    # Leading silence gone, cut in the pause (not mid-word at 10 s), 0.4 s of silence appended.
    assert 8.9 <= info["speech_s"] <= 9.3
    assert abs(out.size / sr - info["speech_s"] - 0.4) < 1e-3
    assert float(np.abs(out[: sr // 10]).max()) > 0.1  # starts with speech
    assert not np.any(out[-int(0.4 * sr) :])
    # A short reference is only trimmed and padded.
    short, info = prepare_reference(mono[: 4 * sr], sr, max_seconds=10.0)
    assert info["capped"] is False and info["speech_s"] == pytest.approx(3.0, abs=0.05)


def test_profile_reports_reference_handling(backend: Qwen3Backend) -> None:
    summary = backend.profile_voice("trim", _reference_wav(21, seconds=2.0), None)
    assert summary["reference"]["capped"] is False
    assert summary["reference"]["speech_s"] <= 2.0


def test_each_job_of_a_batch_is_delivered_when_its_rows_are_done(tiny_model_dir: Path) -> None:
    b = Qwen3Backend("qwen3-0.6b", tiny_model_dir, device="cpu", min_new_tokens=4, tokens_per_char=1.5)
    generating = []
    original = b._talker_generate

    def tracked(batch, sink=None, cancel=None):
        generating.append(True)
        try:
            return original(batch, sink, cancel)
        finally:
            generating.pop()

    b._talker_generate = tracked
    delivered: list[tuple[int, bool, bool]] = []  # (index, batch still generating, other job delivered)
    short, long_ = _req("short", "Hi."), _req("long", "This one is a good deal longer than the other job.")
    results = b.synthesize_batch([long_, short], on_result=lambda i, r: delivered.append(
        (i, bool(generating), len(delivered) > 0)))
    assert b.generate_calls == 1  # one shared batch
    assert [d[0] for d in delivered] == [1, 0]
    # The short job was handed over while the batch was still generating the long one.
    assert delivered[0] == (1, True, False)
    for r in results:
        assert not isinstance(r, BackendError), r


def _stream_with_codes(b: Qwen3Backend, req: SynthesisRequest, **kwargs):
    captured = {}
    original = b._talker_generate

    def capture(batch, sink=None, cancel=None):
        out = original(batch, sink, cancel)
        captured["codes"] = out[0]
        return out

    b._talker_generate = capture
    try:
        stats: dict = {}
        pieces, frames_at_piece = [], []
        for piece in b.synthesize_stream(req, stats=stats, **kwargs):
            pieces.append(piece)
            frames_at_piece.append(stats["frames_generated"])
        return pieces, frames_at_piece, captured["codes"], stats
    finally:
        b._talker_generate = original


def test_stream_yields_pieces_before_the_last_frame(tiny_model_dir: Path) -> None:
    b = Qwen3Backend("qwen3-0.6b", tiny_model_dir, device="cpu", min_new_tokens=8, tokens_per_char=1.0)
    req = _req("s1", "Streaming speech arrives while the model is still talking.", ref_text="A reference.")
    pieces, frames_at_piece, codes, stats = _stream_with_codes(b, req)
    total = codes.shape[0]
    assert total >= 40
    early = [f for f in frames_at_piece if f < total]
    assert len(early) >= 3, frames_at_piece  # several pieces came out before the talker's last frame
    # The first piece comes after a short first chunk (3 frames), the rest every 8 frames.
    assert frames_at_piece[0] <= 3 + 4, frames_at_piece
    assert pieces[0].size < pieces[1].size
    for p in pieces:
        assert p.dtype == np.float32 and p.ndim == 1 and np.all(np.isfinite(p))


def test_stream_matches_the_whole_decode_without_clicks(tiny_model_dir: Path) -> None:
    b = Qwen3Backend("qwen3-0.6b", tiny_model_dir, device="cpu", min_new_tokens=8, tokens_per_char=1.0)
    req = _req("s2", "The joined stream must sound like the whole decode.", ref_text="A reference.")
    pieces, _, codes, _ = _stream_with_codes(b, req)
    works, _ = b._prepare(0, req)
    whole = b.decode_codes(works[0], codes)
    streamed = np.concatenate(pieces)
    assert streamed.shape == whole.shape
    assert float(np.sqrt(np.mean(whole**2))) > 1e-3
    assert float(np.max(np.abs(streamed - whole))) < 0.02
    # At every seam the step between samples is what the whole decode has there (no click added).
    for seam in np.cumsum([p.size for p in pieces])[:-1]:
        assert abs(abs(streamed[seam] - streamed[seam - 1]) - abs(whole[seam] - whole[seam - 1])) < 0.02


def test_stream_of_several_sentences_and_early_close(tiny_model_dir: Path) -> None:
    b = Qwen3Backend("qwen3-0.6b", tiny_model_dir, device="cpu", max_chunk_chars=30, min_new_tokens=6,
                     tokens_per_char=0.4)
    stats: dict = {}
    pieces = list(b.synthesize_stream(_req("s3", "First sentence here. Then a second one."), stats=stats))
    assert stats["chunks"] == 2 and len(pieces) >= 2
    assert np.concatenate(pieces).size > 0
    # A consumer that stops listening stops the generation behind it.
    long_b = Qwen3Backend("qwen3-0.6b", tiny_model_dir, device="cpu", min_new_tokens=8, tokens_per_char=4.0)
    stats = {}
    stream = long_b.synthesize_stream(_req("s4", "A long text that would take a while to speak aloud."),
                                      stats=stats)
    next(stream)
    stream.close()
    bound = long_b.max_new_tokens_for("A long text that would take a while to speak aloud.", "en")
    assert stats["frames_generated"] < bound - 1


def test_a_streamed_request_in_a_batch_hands_over_pieces_as_they_are_made(tiny_model_dir: Path) -> None:
    b = Qwen3Backend("qwen3-0.6b", tiny_model_dir, device="cpu", min_new_tokens=24, tokens_per_char=0.5)
    calls: list[tuple[int, int, int]] = []
    pieces: list[np.ndarray] = []

    def on_chunk(samples: np.ndarray, rate: int, index: int, total: int) -> None:
        calls.append((samples.size, index, total))
        pieces.append(samples)

    streamed = SynthesisRequest(job_id="st1", text="A streamed request beside a plain one.", lang="en",
                                voice_id="v1", reference_wav=_reference_wav(1), ref_text="A reference.",
                                on_chunk=on_chunk)
    plain = _req("st2", "A plain one.", ref_text="A reference.")
    delivered: list[int] = []
    results = b.synthesize_batch([streamed, plain], on_result=lambda i, r: delivered.append(i))
    assert sorted(delivered) == [0, 1]
    first, second = results
    assert isinstance(first, SynthesisResult) and isinstance(second, SynthesisResult)
    assert first.streamed and not second.streamed
    # Several pieces, each saying that one more follows, then an empty last piece that ends the stream.
    assert len(calls) >= 3 and all(size > 0 for size, _, _ in calls[:-1])
    assert [index for _, index, _ in calls] == list(range(len(calls)))
    assert all(total == index + 2 for _, index, total in calls[:-1])
    assert calls[-1] == (0, len(calls) - 1, len(calls))
    # What is stored is exactly what was sent.
    assert np.array_equal(first.samples, np.concatenate(pieces))
    assert first.details["pieces"] == len(calls) - 1


def test_prompt_store_spares_a_new_process_the_prompt(tiny_model_dir: Path) -> None:
    store: dict[str, bytes] = {}

    class DictStore:
        def get(self, key: str) -> bytes | None:
            return store.get(key)

        def put(self, key: str, value: bytes) -> None:
            store[key] = value

    first = Qwen3Backend("qwen3-0.6b", tiny_model_dir, device="cpu", min_new_tokens=6, tokens_per_char=0.2,
                         prompt_store=DictStore())
    req = _req("ps1", "Stored prompts travel.", voice="stored", ref_text="A reference line.", seed=31)
    [a] = first.synthesize_batch([req])
    assert a.details["prompt_cached"] is False and len(store) == 1
    # A fresh backend (a new container) reads the prompt instead of encoding the reference again.
    second = Qwen3Backend("qwen3-0.6b", tiny_model_dir, device="cpu", min_new_tokens=6, tokens_per_char=0.2,
                          prompt_store=DictStore())
    second.load()

    def no_encoding(*args, **kwargs):
        raise AssertionError("the prompt was recomputed")

    second.model.create_voice_clone_prompt = no_encoding
    [b] = second.synthesize_batch([req])
    assert not isinstance(b, BackendError), b
    assert second.prompt_store_hits == 1 and b.details["prompt_cached"] is True and b.details["mode"] == "icl"
    original = first._prompts[first.prompt_key("stored", req.reference_wav, "A reference line.")].item
    restored = second._prompts[second.prompt_key("stored", req.reference_wav, "A reference line.")].item
    assert restored.ref_text == original.ref_text
    assert (restored.ref_code.cpu() == original.ref_code.cpu()).all()
