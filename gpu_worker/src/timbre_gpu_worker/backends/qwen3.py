"""Qwen3-TTS zero-shot voice cloning (the `qwen3-1.7b` and `qwen3-0.6b` backends).

Runs the qwen-tts reference inference code: one voice-clone prompt per voice, computed once and kept
in an LRU cache; long texts cut at sentence boundaries; all chunks of all requests of a batch sorted
by length and generated together in `generate_voice_clone` calls of up to `max_batch` sequences.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from timbre_common.audio import decode_wav, join_chunks, resample, to_mono
from timbre_common.text import split_sentences

from .base import BackendError, BackendUnavailable, SynthesisRequest, SynthesisResult

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
# The 12 Hz codec emits 12.5 frames per second: one talker token is 1920 samples at 24 kHz.
SAMPLES_PER_TOKEN = 1920
MODEL_NAMES = ("qwen3-1.7b", "qwen3-0.6b")

# API language codes -> the names qwen-tts keys `codec_language_id` by.
LANGUAGE_NAMES: dict[str, str] = {
    "en": "english",
    "zh": "chinese",
    "ja": "japanese",
    "ko": "korean",
    "es": "spanish",
    "fr": "french",
    "de": "german",
    "it": "italian",
    "pt": "portuguese",
    "ru": "russian",
}
# Scripts with many syllables per character need more codec frames per character.
_DENSE_SCRIPTS = frozenset({"zh", "ja", "ko"})

REQUIRED_FILES = ("config.json", "model.safetensors", "speech_tokenizer")


def normalise_lang(lang: str) -> str:
    """Reduce a BCP-47 tag ("en-US", "pt_BR") to the two-letter code the backend keys on."""
    return lang.strip().lower().replace("_", "-").split("-", 1)[0]


@dataclass(frozen=True)
class _Prompt:
    item: Any  # qwen_tts.VoiceClonePromptItem
    mode: str  # "icl" | "xvector"


@dataclass
class _Work:
    request_index: int
    chunk_index: int
    text: str
    language: str
    prompt: _Prompt
    max_new_tokens: int


class Qwen3Backend:
    """Qwen3-TTS Base model cloning a voice from reference audio (+ transcript for in-context mode)."""

    languages: frozenset[str] = frozenset(LANGUAGE_NAMES)

    def __init__(
        self,
        name: str,
        model_dir: Path | None,
        device: str = "auto",
        dtype: str = "auto",
        *,
        max_batch: int = 8,
        max_chunk_chars: int = 300,
        prompt_cache_size: int = 128,
        pause_ms: int = 120,
        tokens_per_char: float = 1.6,
        dense_tokens_per_char: float = 3.0,
        min_new_tokens: int = 12,
        max_new_tokens_cap: int = 2048,
        attn_implementation: str | None = None,
    ) -> None:
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown Qwen3 backend {name!r}; expected one of {MODEL_NAMES}")
        self.name = name
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.device = device
        self.dtype = dtype
        self.max_batch = max(1, max_batch)
        self.max_chunk_chars = max_chunk_chars
        self.prompt_cache_size = prompt_cache_size
        self.pause_ms = pause_ms
        self.tokens_per_char = tokens_per_char
        self.dense_tokens_per_char = dense_tokens_per_char
        self.min_new_tokens = min_new_tokens
        self.max_new_tokens_cap = max_new_tokens_cap
        self.attn_implementation = attn_implementation
        self.prompt_cache_hits = 0
        self.prompt_cache_misses = 0
        self.generate_calls = 0
        self._model: Any = None
        self._prompts: OrderedDict[tuple[str, str], _Prompt] = OrderedDict()
        # Generation is not re-entrant (the talker keeps rope deltas on the module) and the prompt
        # cache is shared across worker threads.
        self._model_lock = threading.RLock()
        self._cache_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def available(self) -> bool:
        """True when the model directory holds the weights, config and speech tokenizer."""
        if self.model_dir is None or not self.model_dir.is_dir():
            return False
        return all((self.model_dir / f).exists() for f in REQUIRED_FILES)

    def resolved_device(self) -> str:
        """The torch device the model runs on ("cuda:0" when CUDA is present and device is auto)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> Any:
        """bf16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow and lossy) unless dtype is set."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32

    def load(self) -> None:
        """Load the checkpoint once; raises BackendUnavailable when the weights are absent."""
        with self._model_lock:
            if self._model is not None:
                return
            if not self.available():
                raise BackendUnavailable(f"{self.name}: no Qwen3-TTS checkpoint at {self.model_dir}")
            from .torchaudio_shim import ensure_torchaudio_importable

            ensure_torchaudio_importable()
            from qwen_tts import Qwen3TTSModel

            kwargs: dict[str, Any] = {"device_map": self.resolved_device(), "dtype": self.resolved_dtype()}
            if self.attn_implementation:
                kwargs["attn_implementation"] = self.attn_implementation
            log.info("loading %s from %s (%s)", self.name, self.model_dir, kwargs)
            self._model = Qwen3TTSModel.from_pretrained(str(self.model_dir), **kwargs)

    @property
    def model(self) -> Any:
        """The loaded qwen_tts.Qwen3TTSModel (loads on first use)."""
        if self._model is None:
            self.load()
        return self._model

    # -- voice prompts -------------------------------------------------------------------------

    @staticmethod
    def prompt_key(voice_id: str, reference_wav: bytes, ref_text: str | None) -> tuple[str, str]:
        """Cache key: the voice plus a hash of the exact reference (a re-upload gets a new prompt)."""
        digest = hashlib.sha256(reference_wav)
        digest.update(b"\0" + (ref_text or "").encode("utf-8"))
        return voice_id, digest.hexdigest()

    def _prompt(self, voice_id: str, reference_wav: bytes, ref_text: str | None) -> tuple[_Prompt, bool]:
        ref_text = (ref_text or "").strip() or None
        key = self.prompt_key(voice_id, reference_wav, ref_text)
        with self._cache_lock:
            cached = self._prompts.get(key)
            if cached is not None:
                self._prompts.move_to_end(key)
                self.prompt_cache_hits += 1
                return cached, True
            self.prompt_cache_misses += 1
        try:
            samples, sr = decode_wav(reference_wav)
        except Exception as exc:  # AudioError or anything a malformed upload raises
            raise BackendError("invalid_reference", f"reference audio is not a readable WAV: {exc}") from exc
        mono = to_mono(samples)
        if sr != SAMPLE_RATE:
            mono = resample(mono, sr, SAMPLE_RATE)
        if mono.size < SAMPLES_PER_TOKEN * 2:
            raise BackendError("invalid_reference", "reference audio is too short to clone")
        xvector_only = ref_text is None
        with self._model_lock:
            items = self.model.create_voice_clone_prompt(
                ref_audio=(np.ascontiguousarray(mono, dtype=np.float32), SAMPLE_RATE),
                ref_text=ref_text,
                x_vector_only_mode=xvector_only,
            )
        prompt = _Prompt(item=items[0], mode="xvector" if xvector_only else "icl")
        with self._cache_lock:
            self._prompts[key] = prompt
            self._prompts.move_to_end(key)
            while len(self._prompts) > self.prompt_cache_size:
                self._prompts.popitem(last=False)
        return prompt, False

    def profile_voice(self, voice_id: str, reference_wav: bytes, ref_text: str | None) -> dict:
        """Compute (or reuse) the voice-clone prompt for a voice; returns a JSON-able summary."""
        prompt, cached = self._prompt(voice_id, reference_wav, ref_text)
        _, digest = self.prompt_key(voice_id, reference_wav, (ref_text or "").strip() or None)
        ref_code = getattr(prompt.item, "ref_code", None)
        return {
            "backend": self.name,
            "mode": prompt.mode,
            "reference_sha256": digest,
            "prompt_cached": cached,
            "ref_frames": int(ref_code.shape[0]) if ref_code is not None else 0,
        }

    # -- synthesis -----------------------------------------------------------------------------

    def max_new_tokens_for(self, text: str, lang: str) -> int:
        """Upper bound on codec frames for a chunk: proportional to its length, so a model that never
        emits end-of-speech stops at a few times the expected duration instead of the 2048 default."""
        per_char = self.dense_tokens_per_char if normalise_lang(lang) in _DENSE_SCRIPTS else self.tokens_per_char
        return int(min(self.max_new_tokens_cap, self.min_new_tokens + math.ceil(len(text) * per_char)))

    def _prepare(self, index: int, req: SynthesisRequest) -> tuple[list[_Work], bool]:
        code = normalise_lang(req.lang)
        if code not in LANGUAGE_NAMES:
            raise BackendError(
                "unsupported_language",
                f"language {req.lang!r} is not supported by {self.name}; supported: {sorted(LANGUAGE_NAMES)}",
            )
        if not req.text or not req.text.strip():
            raise BackendError("empty_text", "nothing to synthesize")
        if not req.reference_wav:
            raise BackendError("missing_reference", f"{self.name} clones voices and needs reference audio")
        prompt, cached = self._prompt(req.voice_id, req.reference_wav, req.ref_text)
        chunks = split_sentences(req.text, max_chars=self.max_chunk_chars) or [req.text.strip()]
        work = [
            _Work(index, i, chunk, LANGUAGE_NAMES[code], prompt, self.max_new_tokens_for(chunk, code))
            for i, chunk in enumerate(chunks)
        ]
        return work, cached

    def _generate(self, batch: list[_Work]) -> list[np.ndarray]:
        with self._model_lock:
            self.generate_calls += 1
            wavs, sr = self.model.generate_voice_clone(
                text=[w.text for w in batch],
                language=[w.language for w in batch],
                voice_clone_prompt=[w.prompt.item for w in batch],
                max_new_tokens=max(w.max_new_tokens for w in batch),
            )
        if sr != SAMPLE_RATE:
            wavs = [resample(np.asarray(w, dtype=np.float32), sr, SAMPLE_RATE) for w in wavs]
        out = []
        for w, wav in zip(batch, wavs, strict=True):
            # The batch runs to its longest member's bound; hold each chunk to its own.
            wav = np.asarray(wav, dtype=np.float32).reshape(-1)[: w.max_new_tokens * SAMPLES_PER_TOKEN]
            if wav.size == 0 or not np.all(np.isfinite(wav)):
                raise BackendError("synthesis_failed", "the model produced no usable audio")
            out.append(np.clip(wav, -1.0, 1.0))
        return out

    def synthesize_batch(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult | BackendError]:
        """Synthesize several requests in shared model calls; one result or error per request, in order."""
        results: list[SynthesisResult | BackendError | None] = [None] * len(requests)
        work: list[_Work] = []
        cached_flags: dict[int, bool] = {}
        chunk_counts: dict[int, int] = {}
        for i, req in enumerate(requests):
            try:
                items, cached = self._prepare(i, req)
            except BackendError as exc:
                results[i] = exc
                continue
            except BackendUnavailable:
                raise
            except Exception as exc:  # a bad prompt must not take the rest of the batch down
                log.exception("preparing job %s failed", req.job_id)
                results[i] = BackendError("synthesis_failed", f"could not prepare the voice prompt: {exc}")
                continue
            work.extend(items)
            cached_flags[i] = cached
            chunk_counts[i] = len(items)

        audio: dict[tuple[int, int], np.ndarray] = {}
        batch_sizes: dict[int, int] = {}
        failed: dict[int, BackendError] = {}
        # Similar lengths together: the batch pads to its longest prompt and decodes to its longest output.
        work.sort(key=lambda w: len(w.text))
        for start in range(0, len(work), self.max_batch):
            batch = work[start : start + self.max_batch]
            for w in batch:
                batch_sizes[w.request_index] = max(batch_sizes.get(w.request_index, 0), len(batch))
            try:
                wavs = self._generate(batch)
            except BackendUnavailable:
                raise
            except Exception:
                log.warning("batch of %d failed; retrying its chunks one by one", len(batch), exc_info=True)
                wavs = []
                for w in batch:
                    try:
                        wavs.append(self._generate([w])[0])
                    except BackendError as exc:
                        failed.setdefault(w.request_index, exc)
                        wavs.append(None)
                    except Exception as exc:
                        log.exception("chunk %d of request %d failed", w.chunk_index, w.request_index)
                        failed.setdefault(w.request_index, BackendError("synthesis_failed", str(exc)))
                        wavs.append(None)
            for w, wav in zip(batch, wavs, strict=True):
                if wav is not None:
                    audio[(w.request_index, w.chunk_index)] = wav

        for i, count in chunk_counts.items():
            if i in failed:
                results[i] = failed[i]
                continue
            chunks = [audio[(i, c)] for c in range(count)]
            samples = chunks[0] if count == 1 else join_chunks(chunks, SAMPLE_RATE, pause_ms=self.pause_ms)
            mode = next(w.prompt.mode for w in work if w.request_index == i)
            results[i] = SynthesisResult(
                samples=np.asarray(samples, dtype=np.float32),
                sample_rate=SAMPLE_RATE,
                details={
                    "chunks": count,
                    "batch_size": batch_sizes.get(i, 1),
                    "prompt_cached": cached_flags[i],
                    "mode": mode,
                    "backend": self.name,
                },
            )
        return [r if r is not None else BackendError("synthesis_failed", "no result") for r in results]

    def prompt_cache_size_now(self) -> int:
        """How many voice prompts the cache holds."""
        with self._cache_lock:
            return len(self._prompts)
