"""The embedded CPU backend: bundled voices speak, custom voices map to the nearest one, errors stay local."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from timbre_common.audio import encode_wav
from timbre_gpu_worker.backends import embedded as embedded_module
from timbre_gpu_worker.backends.base import BackendError, SynthesisRequest, SynthesisResult
from timbre_gpu_worker.backends.embedded import EmbeddedBackend
from timbre_gpu_worker.backends.speaker import change_pitch, median_f0
from timbre_gpu_worker.system_voices import (
    SYSTEM_VOICES,
    TIMBRE_VOICE_NAMESPACE,
    system_voice_by_id,
    system_voice_by_name,
)

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank."  # 14 words
REFERENCE_TEXT = (
    "Please call Stella and ask her to bring these things with her from the store. "
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob."
)
VOICE_NAMES = [v.name for v in SYSTEM_VOICES]


@pytest.fixture(scope="module")
def backend() -> Iterator[EmbeddedBackend]:
    be = EmbeddedBackend()
    if not be.available():
        pytest.fail("embedded backend models are not installed in this environment")
    be.load()
    yield be


def _request(
    text: str = SENTENCE, *, lang: str = "en", system_voice: str | None = None, **kw: object
) -> SynthesisRequest:
    return SynthesisRequest(
        job_id=str(uuid.uuid4()),
        text=text,
        lang=lang,
        voice_id=kw.pop("voice_id", str(uuid.uuid4())),  # type: ignore[arg-type]
        system_voice=system_voice,
        **kw,  # type: ignore[arg-type]
    )


def _ok(result: SynthesisResult | BackendError) -> SynthesisResult:
    assert isinstance(result, SynthesisResult), f"expected audio, got {result!r}"
    return result


def _reference(backend: EmbeddedBackend, voice: str, pitch: float) -> bytes:
    """A recording of a bundled voice, pitch-moved, as an uploaded WAV."""
    res = _ok(backend.synthesize_batch([_request(REFERENCE_TEXT, system_voice=voice)])[0])
    return encode_wav(change_pitch(res.samples, res.sample_rate, pitch) * 0.8, res.sample_rate)


# -- catalogue (no models) -------------------------------------------------------------------


def test_system_voice_ids_are_stable_uuid5_and_unique() -> None:
    ids = [v.voice_id for v in SYSTEM_VOICES]
    assert len(set(ids)) == len(ids) == 2
    for v in SYSTEM_VOICES:
        assert v.voice_id == str(uuid.uuid5(TIMBRE_VOICE_NAMESPACE, f"system-voice/{v.engine}/{v.name}"))
        assert uuid.UUID(v.voice_id).version == 5
        assert system_voice_by_id(v.voice_id) is v
        assert system_voice_by_name(v.name) is v
        assert v.lang == "en"
    catalogue = {(v.name, v.engine, v.sample_rate) for v in SYSTEM_VOICES}
    assert catalogue == {("joe", "piper", 22050), ("heart", "hibari", 24000)}
    assert system_voice_by_id(str(uuid.uuid4())) is None


def test_backend_identity() -> None:
    be = EmbeddedBackend()
    assert be.name == "embedded"
    assert be.languages == frozenset({"en"})
    assert be.available() is True


# -- system voices ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("voice", VOICE_NAMES)
def test_each_system_voice_speaks_a_sentence(backend: EmbeddedBackend, voice: str) -> None:
    res = _ok(backend.synthesize_batch([_request(system_voice=voice)])[0])
    expected_rate = system_voice_by_name(voice).sample_rate  # type: ignore[union-attr]
    assert res.sample_rate == expected_rate
    assert res.samples.dtype == np.float32 and res.samples.ndim == 1
    assert 1.5 <= res.audio_seconds <= 8.0
    rms = float(np.sqrt(np.mean(res.samples**2)))
    assert rms > 0.03  # silence or a near-silent hiss would be far below this
    assert float(np.max(np.abs(res.samples))) <= 1.0
    assert res.details["voice"] == voice
    # Speech has a voice pitch; noise would not.
    assert median_f0(res.samples, res.sample_rate) is not None


@pytest.mark.slow
def test_real_time_factor_is_reported_per_voice(backend: EmbeddedBackend) -> None:
    text = " ".join([SENTENCE, REFERENCE_TEXT])
    for voice in VOICE_NAMES:
        backend.synthesize_batch([_request(system_voice=voice)])  # warm caches for this voice
        started = time.perf_counter()
        res = _ok(backend.synthesize_batch([_request(text, system_voice=voice)])[0])
        rtf = (time.perf_counter() - started) / res.audio_seconds
        print(f"\nRTF {voice}: {rtf:.3f} ({res.audio_seconds:.1f} s of audio)")
        assert rtf < 1.0


# -- custom voices ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("voice", VOICE_NAMES)
def test_custom_voice_is_matched_to_the_bundled_voice_it_was_recorded_from(
    backend: EmbeddedBackend, voice: str
) -> None:
    ref = _reference(backend, voice, pitch=1.05)
    profile = backend.profile_voice("custom-" + voice, ref, REFERENCE_TEXT)
    other = next(n for n in VOICE_NAMES if n != voice)
    assert profile["voice"] == voice
    assert profile["similarities"][voice] > profile["similarities"][other]
    assert profile["similarity"] == profile["similarities"][voice]

    res = _ok(backend.synthesize_batch([_request(reference_wav=ref, ref_text=REFERENCE_TEXT)])[0])
    assert res.details["voice"] == voice
    assert res.details["similarity"] == pytest.approx(profile["similarity"])
    assert set(res.details) >= {"voice", "similarity", "ref_f0_hz", "pitch_factor"}
    assert res.sample_rate == system_voice_by_name(voice).sample_rate  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.parametrize("shift", [1.3, 0.8])
def test_pitch_moves_toward_a_shifted_reference(backend: EmbeddedBackend, shift: float) -> None:
    ref = _reference(backend, "joe", pitch=shift)
    res = _ok(backend.synthesize_batch([_request(reference_wav=ref)])[0])
    own_f0 = backend.calibration(res.details["voice"]).median_f0_hz
    ref_f0 = res.details["ref_f0_hz"]
    out_f0 = median_f0(res.samples, res.sample_rate)
    assert own_f0 is not None and ref_f0 is not None and out_f0 is not None
    assert 0.7 <= res.details["pitch_factor"] <= 1.4
    assert abs(out_f0 - ref_f0) < abs(own_f0 - ref_f0)
    if ref_f0 > own_f0:
        assert out_f0 > own_f0
    else:
        assert out_f0 < own_f0


@pytest.mark.slow
def test_a_given_voice_profile_is_used_instead_of_recomputing(
    backend: EmbeddedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = _reference(backend, "joe", pitch=1.0)
    profile = backend.profile_voice("v-profile", ref, None)
    assert profile["voice"] == "joe"
    forced = {**profile, "voice": "heart", "pitch_factor": 1.0}

    def no_profiling(*args: object, **kwargs: object) -> dict:
        raise AssertionError("profile_voice must not run when a usable voice_profile is given")

    monkeypatch.setattr(backend, "profile_voice", no_profiling)
    res = _ok(backend.synthesize_batch([_request(reference_wav=ref, voice_profile=forced)])[0])
    assert res.details["voice"] == "heart" and res.sample_rate == 24000


@pytest.mark.slow
def test_profiles_are_cached_and_the_cache_is_bounded(
    backend: EmbeddedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "profile_cache_size", 2)
    ref = _reference(backend, "heart", pitch=1.0)
    first = backend.profile_voice("lru-a", ref, None)
    json.dumps(first)  # the profile travels in messages
    assert backend.profile_voice("lru-a", ref, None) == first
    backend.profile_voice("lru-b", ref, None)
    backend.profile_voice("lru-c", ref, None)
    cached_ids = [voice_id for voice_id, _ in backend._profiles]
    assert len(cached_ids) == 2 and "lru-a" not in cached_ids


# -- errors stay per request -----------------------------------------------------------------


@pytest.mark.slow
def test_bad_requests_fail_alone_in_a_batch(backend: EmbeddedBackend) -> None:
    results = backend.synthesize_batch(
        [
            _request(system_voice="heart"),
            _request(lang="fr", system_voice="heart"),
            _request("   \n\t", system_voice="joe"),
            _request(system_voice="nobody"),
            _request(reference_wav=b"RIFF not really a wav"),
            _request(lang="en-US", system_voice="joe"),
        ]
    )
    assert len(results) == 6
    _ok(results[0])
    assert isinstance(results[1], BackendError) and results[1].code == "unsupported_language"
    assert isinstance(results[2], BackendError) and results[2].code == "empty_text"
    assert isinstance(results[3], BackendError) and results[3].code == "unknown_voice"
    assert isinstance(results[4], BackendError) and results[4].code == "invalid_reference"
    assert _ok(results[5]).sample_rate == 22050


# -- long text -------------------------------------------------------------------------------

LONG_TEXT = " ".join(
    [
        "Timbre turns written words into speech for anyone who needs a voice.",
        "It reads articles aloud, narrates short stories, and announces trains at small stations.",
        "Every sentence is synthesized separately, so a long text never exhausts the model's context.",
        "Between sentences the engine leaves a short pause, the way a careful reader takes a breath.",
        "The edges of every piece of audio are faded in and out so that no click can be heard.",
        "A listener should never notice where one sentence ends and the next one begins.",
        "Numbers such as 42 and dates such as March 3rd are expanded into words before synthesis.",
        "Punctuation shapes the melody: a question rises at the end, and a statement falls.",
        "The worker runs these models on ordinary processors when no graphics card is available.",
        "It is slower than a data centre accelerator, but still far faster than real time.",
        "Long documents are split at sentence boundaries and stitched back together afterwards.",
        "The result is one continuous recording, normalised so that no sample ever exceeds full scale.",
        "Quality checks measure loudness, pitch and duration to catch a broken model early.",
        "When a request cannot succeed, the worker says why, and the other requests carry on.",
        "Some sentences run on and on, clause after clause, with commas where a speaker might pause, "
        "lists of things like apples, pears, plums and cherries, asides that wander off the point, "
        "and further qualifications that a patient reader follows, until at last, well past the limit "
        "that one chunk of synthesis is allowed to hold, the sentence finally comes to rest.",
        "That is all there is to it, and now this rather long paragraph has come to its end.",
    ]
)


@pytest.mark.slow
@pytest.mark.parametrize("voice", VOICE_NAMES)
def test_long_text_is_chunked_and_joined_without_clicks(
    backend: EmbeddedBackend, monkeypatch: pytest.MonkeyPatch, voice: str
) -> None:
    assert len(LONG_TEXT) >= 1500
    seen: dict[str, object] = {}
    real_join = embedded_module.join_chunks

    def spy_join(
        chunks: list[np.ndarray], sample_rate: int, pause_ms: int = 120, fade_ms: int = 10
    ) -> np.ndarray:
        out = real_join(chunks, sample_rate, pause_ms=pause_ms, fade_ms=fade_ms)
        seen.update(chunks=[c.copy() for c in chunks], joined=out.copy(), pause_ms=pause_ms, rate=sample_rate)
        return out

    monkeypatch.setattr(embedded_module, "join_chunks", spy_join)
    res = _ok(backend.synthesize_batch([_request(LONG_TEXT, system_voice=voice)])[0])

    chunks: list[np.ndarray] = seen["chunks"]  # type: ignore[assignment]
    joined: np.ndarray = seen["joined"]  # type: ignore[assignment]
    assert len(chunks) >= 5
    assert float(np.max(np.abs(res.samples))) <= 1.0
    assert 60.0 <= res.audio_seconds <= 200.0  # ~250 words
    # At every join the signal steps far less sharply than the speech does inside the chunks.
    inner_step = max(float(np.max(np.abs(np.diff(c)))) for c in chunks)
    pause = int(seen["rate"] * seen["pause_ms"] / 1000)  # type: ignore[operator]
    pos = 0
    for chunk in chunks[:-1]:
        pos += len(chunk)
        region = joined[max(0, pos - 64) : pos + pause + 64]
        assert float(np.max(np.abs(np.diff(region)))) <= 0.25 * inner_step
        # The pause itself is silent and the chunk edges are faded to (nearly) zero.
        assert float(np.max(np.abs(joined[pos : pos + pause]))) == 0.0
        assert abs(float(joined[pos - 1])) < 0.01 * float(np.max(np.abs(chunk)))
        pos += pause


@pytest.mark.slow
def test_concurrent_batches_from_worker_threads(backend: EmbeddedBackend) -> None:
    from concurrent.futures import ThreadPoolExecutor

    voices = ["heart", "joe", "heart", "joe"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda v: backend.synthesize_batch([_request(system_voice=v)])[0], voices))
    for voice, result in zip(voices, results, strict=True):
        res = _ok(result)
        assert res.details["voice"] == voice and 1.5 <= res.audio_seconds <= 8.0


@pytest.mark.parametrize("voice", VOICE_NAMES)
def test_a_streamed_request_hands_over_pieces_that_make_the_whole_audio(backend: EmbeddedBackend,
                                                                       voice: str) -> None:
    text = ("The harbour was calm at dawn, and the gulls were still asleep on the pier. Fishermen loaded "
            "their nets. A bell rang twice across the water. Then the first boat left the quay.")
    got: list[tuple[np.ndarray, int, int, int]] = []
    result = backend.synthesize_batch([_request(text, system_voice=voice,
                                                on_chunk=lambda s, r, i, n: got.append((s.copy(), r, i, n)))])[0]
    assert isinstance(result, SynthesisResult) and result.streamed
    parts = backend.stream_parts(text)
    assert len(parts) >= 3 and len(parts[0]) <= backend.first_stream_chunk_chars
    assert [i for _, _, i, _ in got] == list(range(len(parts))) and {n for *_, n in got} == {len(parts)}
    assert {r for _, r, _, _ in got} == {result.sample_rate}
    assert np.array_equal(np.concatenate([s for s, *_ in got]), result.samples)
    # The first piece is a short clause: much less than the whole.
    assert got[0][0].size < result.samples.size / 3
    assert float(np.max(np.abs(result.samples))) <= 0.9 + 1e-6
