"""Qwen3-TTS zero-shot voice cloning (the `qwen3-1.7b` and `qwen3-0.6b` backends).

One voice-clone prompt per voice (from a trimmed, silence-padded reference), computed once and kept in
an LRU cache; long texts cut at sentence boundaries and joined with a crossfade. Two decode paths:

- the reference decode of qwen-tts (Hugging Face `generate`, dynamic cache) on CPU, or on CUDA when the
  graph library is absent. Concurrent calls interleave step by step (one talker step at a time), so a
  short job is not held behind a long one; each job is delivered as soon as its own rows are done.
- on CUDA, `qwen3_cuda.GraphDecoder` (faster-qwen3-tts / faster-qwen3-tts-batch): captured CUDA graphs,
  static KV caches and continuous batching across concurrent requests.

`synthesize_stream` yields audio every few codec frames, decoded with left context so chunk edges join
without clicks.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from timbre_common.audio import crossfade_join, decode_wav, join_chunks, resample, to_mono
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

# Streaming: a piece every STREAM_CHUNK_FRAMES codec frames (0.64 s of audio), each decoded with
# DECODE_CONTEXT_FRAMES frames of left context (what the codec's own chunked decode uses) and joined to
# the previous piece with a short crossfade.
STREAM_CHUNK_FRAMES = 8
# The first piece of a request comes sooner (0.24 s of audio): time to first audio is what a listener
# waits for; later pieces are larger, so the codec runs fewer, longer windows.
STREAM_FIRST_CHUNK_FRAMES = 3
DECODE_CONTEXT_FRAMES = 25
SEAM_CROSSFADE_SAMPLES = 240  # 10 ms
# Sentence chunks of one request are joined with this crossfade instead of fade-out, pause, fade-in.
JOIN_CROSSFADE_MS = 30

# References: the model needs a few seconds of clean speech. Silence is trimmed at both ends, an x-vector
# reference is capped (at a quiet point), and the end is padded with silence so the reference's last
# phoneme does not bleed into the output. An in-context reference cannot be cut without its transcript
# going out of step, so one longer than ICL_REFERENCE_MAX_S is used as an x-vector reference instead.
REFERENCE_MAX_S = 12.0
ICL_REFERENCE_MAX_S = 20.0
REFERENCE_TAIL_SILENCE_S = 0.4
_SILENCE_DB = -40.0  # frames this far below the loudest frame are silence
_FRAME_S = 0.02


def prepare_reference(mono: np.ndarray, sr: int, *, max_seconds: float | None = REFERENCE_MAX_S,
                      tail_silence_s: float = REFERENCE_TAIL_SILENCE_S) -> tuple[np.ndarray, dict]:
    """Trim leading and trailing silence, cap the length at a quiet point, pad the end with silence.

    Returns the samples and a summary (seconds before and after, whether it was capped).
    """
    x = np.asarray(mono, dtype=np.float32).reshape(-1)
    info: dict[str, Any] = {"input_s": round(x.size / sr, 3), "capped": False}
    frame = max(1, int(sr * _FRAME_S))
    n_frames = x.size // frame
    if n_frames >= 3:
        rms = np.sqrt(np.mean(x[: n_frames * frame].reshape(n_frames, frame).astype(np.float64) ** 2, axis=1))
        peak = float(rms.max())
        if peak > 0:
            voiced = np.flatnonzero(rms >= peak * 10 ** (_SILENCE_DB / 20))
            margin = 2  # keep 40 ms around the speech
            first = max(0, int(voiced[0]) - margin)
            last = min(n_frames, int(voiced[-1]) + 1 + margin)
            x = x[first * frame : min(x.size, last * frame)]
            if max_seconds is not None and x.size > int(max_seconds * sr):
                limit = int(max_seconds * sr)
                # Cut at the quietest frame of the last two seconds before the limit.
                lo = max(0, (limit - 2 * sr) // frame)
                hi = limit // frame
                window = rms[first + lo : first + hi]
                cut = (lo + int(np.argmin(window))) * frame if window.size else limit
                x = x[: max(frame, cut)]
                info["capped"] = True
    pad = np.zeros(int(tail_silence_s * sr), dtype=np.float32)
    info["speech_s"] = round(x.size / sr, 3)
    return np.concatenate([x, pad]), info


def normalise_lang(lang: str) -> str:
    """Reduce a BCP-47 tag ("en-US", "pt_BR") to the two-letter code the backend keys on."""
    return lang.strip().lower().replace("_", "-").split("-", 1)[0]


@dataclass(frozen=True)
class _Prompt:
    item: Any  # qwen_tts.VoiceClonePromptItem
    mode: str  # "icl" | "xvector"
    reference: dict  # what prepare_reference did


@dataclass
class _Work:
    request_index: int
    chunk_index: int
    text: str
    language: str
    prompt: _Prompt
    max_new_tokens: int


class PromptStore(Protocol):
    """Somewhere voice prompts outlive a process (a Modal Dict on Modal): get and put bytes by key."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...


class GenerationCancelled(Exception):
    """A streaming consumer went away: the generation behind it stops at its next step."""


# on_row(row index in the batch, codes (frames x 16, on CPU), truncated: ran into its frame bound)
RowCallback = Callable[[int, Any, bool], None]


class Qwen3Backend:
    """Qwen3-TTS Base model cloning a voice from reference audio (+ transcript for in-context mode)."""

    languages: frozenset[str] = frozenset(LANGUAGE_NAMES)
    # Calls from several threads interleave (step by step, or through the CUDA scheduler's slots), so the
    # engine may run a short-text lane beside a long-text lane.
    concurrent_lanes = True

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
        tokens_per_char: float = 1.6,
        dense_tokens_per_char: float = 3.0,
        min_new_tokens: int = 12,
        max_new_tokens_cap: int = 2048,
        attn_implementation: str | None = None,
        graphs: str = "auto",
        max_seq_len: int = 4096,
        prompt_store: PromptStore | None = None,
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
        self.tokens_per_char = tokens_per_char
        self.dense_tokens_per_char = dense_tokens_per_char
        self.min_new_tokens = min_new_tokens
        self.max_new_tokens_cap = max_new_tokens_cap
        self.attn_implementation = attn_implementation
        # "auto": the CUDA-graph decode on CUDA when faster-qwen3-tts is installed; "off": reference only.
        self.graphs = graphs
        self.max_seq_len = max_seq_len
        # Prompts shared beyond this process: a new container reads a voice's prompt instead of
        # recomputing it from the reference.
        self.prompt_store = prompt_store
        self.prompt_store_hits = 0
        self.prompt_cache_hits = 0
        self.prompt_cache_misses = 0
        self.generate_calls = 0
        self._model: Any = None
        self._graph_decoder: Any = None  # qwen3_cuda.GraphDecoder on CUDA
        self._prompts: OrderedDict[tuple[str, str], _Prompt] = OrderedDict()
        self._load_lock = threading.RLock()
        self._cache_lock = threading.Lock()
        # The talker keeps per-generation state (rope deltas) on the module, so concurrent reference
        # generations take turns one step at a time: each step holds _step_lock, and a thread's own
        # rope deltas are put back on the module before its step (see _install_step_hooks).
        self._step_lock = threading.Lock()
        self._local = threading.local()

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
        with self._load_lock:
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
            model = Qwen3TTSModel.from_pretrained(str(self.model_dir), **kwargs)
            self._install_step_hooks(model.model.talker)
            if self.graphs != "off" and self.resolved_device().startswith("cuda"):
                self._graph_decoder = self._load_graph_decoder(model)
            self._model = model

    def _load_graph_decoder(self, model: Any) -> Any:
        """The CUDA-graph decoder, or None (reference decode) when its library is not installed."""
        try:
            from .qwen3_cuda import GraphDecoder
        except ImportError as exc:
            log.warning("%s: CUDA graphs unavailable (%s); using the reference decode", self.name, exc)
            return None
        try:
            return GraphDecoder(model, max_batch=self.max_batch, max_seq_len=self.max_seq_len)
        except Exception:
            # A capture that fails (a library or driver mismatch) leaves the worker serving, slower: the
            # health report and the bench name the decode path, and this error says why.
            log.exception("%s: CUDA graph capture failed; using the reference decode", self.name)
            return None

    @contextlib.contextmanager
    def reference_decode(self) -> Iterator[None]:
        """Run the reference decode even where the CUDA graphs are loaded (benchmarks compare the two in
        one process); not for serving: concurrent callers would see the switch too."""
        self.load()
        saved, self._graph_decoder = self._graph_decoder, None
        try:
            yield
        finally:
            self._graph_decoder = saved

    @property
    def decode_path(self) -> str:
        """"cuda-graphs" or "reference"."""
        return "cuda-graphs" if self._graph_decoder is not None else "reference"

    def _install_step_hooks(self, talker: Any) -> None:
        """Turn-taking of concurrent generations, and a per-step view of the codec frames.

        Before each talker step the thread takes the step lock and restores its own rope deltas; after
        it, saves them, lets the lock go, and hands the step's frames (B x 16 codes) to its sink.
        """
        local = self._local
        lock = self._step_lock

        def before(module: Any, args: Any, kwargs: Any) -> None:
            lock.acquire()
            module.rope_deltas = getattr(local, "rope_deltas", None)

        def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            try:
                local.rope_deltas = module.rope_deltas
            finally:
                lock.release()
            if output is None:  # the step raised; its exception propagates
                return
            cancel = getattr(local, "cancel", None)
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled()
            sink = getattr(local, "sink", None)
            codec_ids = output.hidden_states[1] if output.hidden_states is not None else None
            if sink is not None and codec_ids is not None:
                sink(codec_ids.detach().to("cpu"))

        talker.register_forward_pre_hook(before, with_kwargs=True)
        talker.register_forward_hook(after, with_kwargs=True, always_call=True)

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
        stored = self._stored_prompt(key)
        if stored is not None:
            self._keep(key, stored)
            return stored, True
        prompt = self._compute_prompt(reference_wav, ref_text)
        self._keep(key, prompt)
        if self.prompt_store is not None:
            try:
                self.prompt_store.put(self.store_key(key), self.export_prompt(prompt))
            except Exception:  # the store is an optimisation: a failure costs a recomputation later
                log.warning("%s: could not store the prompt of voice %s", self.name, key[0], exc_info=True)
        return prompt, False

    def store_key(self, key: tuple[str, str]) -> str:
        """The prompt store's key: backend, voice, reference hash (a re-upload is a new prompt)."""
        return f"{self.name}:{key[0]}:{key[1]}"

    def _stored_prompt(self, key: tuple[str, str]) -> _Prompt | None:
        if self.prompt_store is None:
            return None
        try:
            data = self.prompt_store.get(self.store_key(key))
            prompt = self.import_prompt(data) if data else None
        except Exception:
            log.warning("%s: stored prompt of voice %s unreadable; recomputing", self.name, key[0], exc_info=True)
            return None
        if prompt is not None:
            self.prompt_store_hits += 1
        return prompt

    def _keep(self, key: tuple[str, str], prompt: _Prompt) -> None:
        with self._cache_lock:
            self._prompts[key] = prompt
            self._prompts.move_to_end(key)
            while len(self._prompts) > self.prompt_cache_size:
                self._prompts.popitem(last=False)

    def export_prompt(self, prompt: _Prompt) -> bytes:
        """A voice prompt as bytes (tensors on CPU), for a prompt store or a work order."""
        import io

        import torch

        item = prompt.item
        data = {
            "ref_code": None if item.ref_code is None else item.ref_code.detach().to("cpu"),
            "ref_spk_embedding": item.ref_spk_embedding.detach().to("cpu"),
            "x_vector_only_mode": bool(item.x_vector_only_mode),
            "icl_mode": bool(item.icl_mode),
            "ref_text": item.ref_text,
            "mode": prompt.mode,
            "reference": prompt.reference,
        }
        buf = io.BytesIO()
        torch.save(data, buf)
        return buf.getvalue()

    def import_prompt(self, blob: bytes) -> _Prompt:
        """The inverse of export_prompt, with tensors on this model's device."""
        import io

        import torch
        from qwen_tts.inference.qwen3_tts_model import VoiceClonePromptItem

        data = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        device = self.model.model.talker.device
        item = VoiceClonePromptItem(
            ref_code=None if data["ref_code"] is None else data["ref_code"].to(device),
            ref_spk_embedding=data["ref_spk_embedding"].to(device),
            x_vector_only_mode=data["x_vector_only_mode"],
            icl_mode=data["icl_mode"],
            ref_text=data["ref_text"],
        )
        return _Prompt(item=item, mode=data["mode"], reference=dict(data["reference"]))

    def _compute_prompt(self, reference_wav: bytes, ref_text: str | None) -> _Prompt:
        try:
            samples, sr = decode_wav(reference_wav)
        except Exception as exc:  # AudioError or anything a malformed upload raises
            raise BackendError("invalid_reference", f"reference audio is not a readable WAV: {exc}") from exc
        mono = to_mono(samples)
        if sr != SAMPLE_RATE:
            mono = resample(mono, sr, SAMPLE_RATE)
        xvector_only = ref_text is None
        mono, info = prepare_reference(mono, SAMPLE_RATE, max_seconds=REFERENCE_MAX_S if xvector_only else None)
        if not xvector_only and info["speech_s"] > ICL_REFERENCE_MAX_S:
            # Too long to use with its transcript: clone from the speaker embedding of its first seconds.
            mono, info = prepare_reference(mono, SAMPLE_RATE, max_seconds=REFERENCE_MAX_S)
            info["icl_dropped"] = "reference_too_long"
            xvector_only, ref_text = True, None
        if info["speech_s"] * SAMPLE_RATE < SAMPLES_PER_TOKEN * 2:
            raise BackendError("invalid_reference", "reference audio is too short to clone")
        items = self.model.create_voice_clone_prompt(
            ref_audio=(np.ascontiguousarray(mono, dtype=np.float32), SAMPLE_RATE),
            ref_text=ref_text,
            x_vector_only_mode=xvector_only,
        )
        return _Prompt(item=items[0], mode="xvector" if xvector_only else "icl", reference=info)

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
            "reference": prompt.reference,
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

    # -- codes: the talker ---------------------------------------------------------------------

    @property
    def _eos_id(self) -> int:
        return int(self.model.model.config.talker_config.codec_eos_token_id)

    def _talker_generate(self, batch: list[_Work], sink: Callable[[Any], None] | None = None,
                         cancel: threading.Event | None = None) -> list[Any]:
        """The reference generation (qwen-tts `generate`) of a batch; codes per row, cut at end-of-speech.

        `sink` sees every step's frames (B x 16); `cancel` stops the generation at its next step.
        """
        model = self.model
        items = [w.prompt.item for w in batch]
        prompt = model._prompt_items_to_voice_clone_prompt(items)
        input_ids = model._tokenize_texts([model._build_assistant_text(w.text) for w in batch])
        ref_ids = [model._tokenize_texts([model._build_ref_text(it.ref_text)])[0] if it.ref_text else None
                   for it in items]
        kwargs = model._merge_generate_kwargs(max_new_tokens=max(w.max_new_tokens for w in batch))
        local = self._local
        local.rope_deltas, local.sink, local.cancel = None, sink, cancel
        try:
            self.generate_calls += 1
            codes, _ = model.model.generate(input_ids=input_ids, ref_ids=ref_ids, voice_clone_prompt=prompt,
                                            languages=[w.language for w in batch], non_streaming_mode=False,
                                            **kwargs)
        finally:
            local.rope_deltas, local.sink, local.cancel = None, None, None
        return [c.detach().to("cpu") for c in codes]

    def _run_rows(self, batch: list[_Work], on_row: RowCallback) -> None:
        """Generate a batch and call on_row for each row as soon as that row is done.

        A row is done at its end-of-speech or at its own frame bound, whichever comes first, even while
        longer rows of the same batch keep going.
        """
        if self._graph_decoder is not None:
            self._graph_decoder.run(batch, on_row)
            return
        import torch

        eos = self._eos_id
        frames: list[list[Any]] = [[] for _ in batch]
        done = [False] * len(batch)
        bound = max(w.max_new_tokens for w in batch)

        def finish(b: int, truncated: bool) -> None:
            done[b] = True
            codes = torch.stack(frames[b]) if frames[b] else torch.zeros((0, 16), dtype=torch.long)
            on_row(b, codes, truncated)

        def sink(step: Any) -> None:
            for b, w in enumerate(batch):
                if done[b]:
                    continue
                if int(step[b, 0]) == eos:  # a finished row is fed end-of-speech from here on
                    finish(b, False)
                    continue
                frames[b].append(step[b])
                if len(frames[b]) >= w.max_new_tokens:
                    finish(b, True)

        codes = self._talker_generate(batch, sink)
        for b, w in enumerate(batch):
            if not done[b]:
                frames[b] = list(codes[b][: w.max_new_tokens])
                # generate makes at most bound - 1 frames: a row that made them never said it was done
                finish(b, codes[b].shape[0] >= bound - 1)

    # -- audio: the codec ----------------------------------------------------------------------

    def _context(self, work: _Work) -> Any:
        """Left context for decoding a chunk: the end of the reference's codes (in-context mode)."""
        import torch

        ref_code = getattr(work.prompt.item, "ref_code", None)
        if ref_code is None:
            return torch.zeros((0, 16), dtype=torch.long)
        return ref_code[-DECODE_CONTEXT_FRAMES:].detach().to("cpu").long()

    def _decode_window(self, codes: Any, start: int, end: int) -> np.ndarray:
        """Audio of frames [start, end) of `codes`, decoded with up to DECODE_CONTEXT_FRAMES of left context."""
        import torch

        decoder = self.model.model.speech_tokenizer.model.decoder
        up = int(decoder.total_upsample)
        ctx = min(DECODE_CONTEXT_FRAMES, start)
        device = next(decoder.parameters()).device
        window = codes[start - ctx : end].to(device).clamp(min=0).transpose(0, 1).unsqueeze(0)
        with torch.inference_mode():
            wav = decoder(window)
        return wav[0, 0, ctx * up :].float().cpu().numpy()

    def decode_codes(self, work: _Work, codes: Any) -> np.ndarray:
        """The chunk's audio, decoded in one piece after the reference context (the non-streamed decode)."""
        import torch

        if codes.shape[0] == 0:
            raise BackendError("synthesis_failed", "the model produced no audio")
        ctx = self._context(work)
        full = torch.cat([ctx, codes.long()], dim=0)
        return self._check(self._decode_window(full, ctx.shape[0], full.shape[0]))

    @staticmethod
    def _check(wav: np.ndarray) -> np.ndarray:
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if wav.size == 0 or not np.all(np.isfinite(wav)):
            raise BackendError("synthesis_failed", "the model produced no usable audio")
        return np.clip(wav, -1.0, 1.0)

    # -- batches -------------------------------------------------------------------------------

    def synthesize_batch(self, requests: Sequence[SynthesisRequest],
                         on_result: Callable[[int, SynthesisResult | BackendError], None] | None = None,
                         ) -> list[SynthesisResult | BackendError]:
        """Synthesize several requests in shared model calls; one result or error per request, in order.

        `on_result(index, result)` is called for each request as soon as its last chunk is decoded,
        while the rest of the batch keeps running. A streamed request (`on_chunk` set) is spoken through
        `synthesize_stream`, its pieces handed over every few codec frames, beside the rest of the batch.
        """
        streamed = [i for i, r in enumerate(requests) if r.on_chunk is not None]
        if streamed:
            return self._with_streams(requests, streamed, on_result)
        results: list[SynthesisResult | BackendError | None] = [None] * len(requests)

        def deliver(i: int, result: SynthesisResult | BackendError) -> None:
            if results[i] is not None:
                return
            results[i] = result
            if on_result is not None:
                try:
                    on_result(i, result)
                except Exception:  # the receiver's problem must not stop the batch
                    log.exception("delivering job %s failed", requests[i].job_id)

        work: list[_Work] = []
        cached_flags: dict[int, bool] = {}
        pending: dict[int, int] = {}
        for i, req in enumerate(requests):
            try:
                items, cached = self._prepare(i, req)
            except BackendError as exc:
                deliver(i, exc)
                continue
            except BackendUnavailable:
                raise
            except Exception as exc:  # a bad prompt must not take the rest of the batch down
                log.exception("preparing job %s failed", req.job_id)
                deliver(i, BackendError("synthesis_failed", f"could not prepare the voice prompt: {exc}"))
                continue
            work.extend(items)
            cached_flags[i] = cached
            pending[i] = len(items)

        audio: dict[tuple[int, int], np.ndarray] = {}
        truncated: dict[int, list[int]] = {}
        batch_sizes: dict[int, int] = {}
        lock = threading.Lock()

        def chunk_done(w: _Work, wav: np.ndarray | None, error: BackendError | None, cut: bool) -> None:
            i = w.request_index
            with lock:
                if results[i] is not None:
                    return
                if error is not None:
                    deliver(i, error)
                    return
                audio[(i, w.chunk_index)] = wav
                if cut:
                    truncated.setdefault(i, []).append(w.chunk_index)
                pending[i] -= 1
                if pending[i] == 0:
                    deliver(i, self._result(i, requests[i], audio, work, cached_flags[i], batch_sizes.get(i, 1),
                                            truncated.get(i, [])))

        def on_row_of(batch: list[_Work]) -> RowCallback:
            def on_row(b: int, codes: Any, cut: bool) -> None:
                w = batch[b]
                try:
                    wav = self.decode_codes(w, codes)
                except BackendError as exc:
                    chunk_done(w, None, exc, cut)
                    return
                chunk_done(w, wav, None, cut)
            return on_row

        # Similar lengths together: the batch pads to its longest prompt and runs to its longest output.
        # The CUDA scheduler takes everything at once and fills its slots as earlier rows end.
        work.sort(key=lambda w: len(w.text))
        step = max(1, len(work)) if self._graph_decoder is not None else self.max_batch
        for start in range(0, len(work), step):
            batch = work[start : start + step]
            for w in batch:
                batch_sizes[w.request_index] = max(batch_sizes.get(w.request_index, 0), len(batch))
            try:
                self._run_rows(batch, on_row_of(batch))
            except BackendUnavailable:
                raise
            except Exception:
                log.warning("batch of %d failed; retrying its chunks one by one", len(batch), exc_info=True)
                for w in batch:
                    if results[w.request_index] is not None or (w.request_index, w.chunk_index) in audio:
                        continue
                    try:
                        self._run_rows([w], on_row_of([w]))
                    except BackendError as exc:
                        chunk_done(w, None, exc, False)
                    except Exception as exc:
                        log.exception("chunk %d of request %d failed", w.chunk_index, w.request_index)
                        chunk_done(w, None, BackendError("synthesis_failed", str(exc)), False)

        return [r if r is not None else BackendError("synthesis_failed", "no result") for r in results]

    def _with_streams(self, requests: Sequence[SynthesisRequest], streamed: list[int],
                      on_result: Callable[[int, SynthesisResult | BackendError], None] | None,
                      ) -> list[SynthesisResult | BackendError]:
        """Streamed requests each in a thread of their own (the step lock, or the CUDA scheduler, lets them
        share the model with the rest), the others as one batch."""
        results: list[SynthesisResult | BackendError | None] = [None] * len(requests)

        def deliver(i: int, result: SynthesisResult | BackendError) -> None:
            results[i] = result
            if on_result is not None:
                try:
                    on_result(i, result)
                except Exception:
                    log.exception("delivering job %s failed", requests[i].job_id)

        threads = [threading.Thread(target=lambda i=i: deliver(i, self._stream_request(requests[i])),
                                    name=f"{self.name}-stream-{i}", daemon=True) for i in streamed]
        for t in threads:
            t.start()
        plain = [i for i in range(len(requests)) if i not in streamed]
        try:
            if plain:
                done = self.synthesize_batch([requests[i] for i in plain],
                                             on_result=lambda j, r: deliver(plain[j], r))
                for j, r in enumerate(done):
                    results[plain[j]] = r
        finally:
            for t in threads:
                t.join()
        return [r if r is not None else BackendError("synthesis_failed", "no result") for r in results]

    def _stream_request(self, request: SynthesisRequest) -> SynthesisResult | BackendError:
        """Speak one request piece by piece to its on_chunk; the stored audio is exactly the pieces sent.

        How many pieces there will be is known only at the end: each piece says one more follows
        (`total` = index + 2), and an empty last piece closes the stream."""
        assert request.on_chunk is not None
        started = time.perf_counter()
        stats: dict[str, Any] = {}
        pieces: list[np.ndarray] = []
        try:
            for piece in self.synthesize_stream(request, stats=stats):
                request.on_chunk(piece, SAMPLE_RATE, len(pieces), len(pieces) + 2)
                pieces.append(piece)
        except BackendError as exc:
            return exc
        except BackendUnavailable as exc:
            return BackendError("backend_unavailable", str(exc))
        except Exception as exc:
            log.exception("streaming job %s failed", request.job_id)
            return BackendError("synthesis_failed", f"{type(exc).__name__}: {exc}")
        request.on_chunk(np.zeros(0, dtype=np.float32), SAMPLE_RATE, len(pieces), len(pieces) + 1)
        samples = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, dtype=np.float32)
        seconds = samples.size / SAMPLE_RATE
        details: dict[str, Any] = {
            "chunks": stats.get("chunks", 1),
            "pieces": len(pieces),
            "batch_size": 1,
            "backend": self.name,
            "decode": self.decode_path,
            "truncated": bool(stats.get("truncated")),
        }
        if seconds:
            details["rtf"] = round((time.perf_counter() - started) / seconds, 4)
        return SynthesisResult(samples=samples, sample_rate=SAMPLE_RATE, details=details, streamed=True)

    def _result(self, i: int, req: SynthesisRequest, audio: dict[tuple[int, int], np.ndarray], work: list[_Work],
                cached: bool, batch_size: int, truncated: list[int]) -> SynthesisResult:
        mine = sorted((w for w in work if w.request_index == i), key=lambda w: w.chunk_index)
        chunks = [audio[(i, w.chunk_index)] for w in mine]
        samples = chunks[0] if len(chunks) == 1 else join_chunks(chunks, SAMPLE_RATE, crossfade_ms=JOIN_CROSSFADE_MS)
        details: dict[str, Any] = {
            "chunks": len(chunks),
            "batch_size": batch_size,
            "prompt_cached": cached,
            "mode": mine[0].prompt.mode,
            "backend": self.name,
            "decode": self.decode_path,
            "truncated": bool(truncated),
        }
        if truncated:
            # A chunk ran into its frame bound without the model ending it: its speech may be cut short.
            details["truncated_chunks"] = sorted(truncated)
        return SynthesisResult(samples=np.asarray(samples, dtype=np.float32), sample_rate=SAMPLE_RATE,
                               details=details)

    # -- streaming -----------------------------------------------------------------------------

    def synthesize_stream(self, request: SynthesisRequest, *, chunk_frames: int = STREAM_CHUNK_FRAMES,
                          first_chunk_frames: int = STREAM_FIRST_CHUNK_FRAMES,
                          stats: dict | None = None) -> Iterator[np.ndarray]:
        """Yield the request's audio (float32, 24 kHz) every `chunk_frames` codec frames as it is generated.

        Each piece is decoded with left context and crossfaded into the previous one; sentence chunks of
        a long text follow one another with a crossfade. `stats`, when given, is filled with
        `frames_generated` (frames the talker had produced so far, updated as it runs), `truncated` and
        `chunks`. Closing the generator early stops the generation at its next step.
        """
        works, _ = self._prepare(0, request)
        stats = stats if stats is not None else {}
        stats.update(frames_generated=0, truncated=False, chunks=len(works))
        held = np.zeros(0, dtype=np.float32)  # the end of the last piece, kept back for the next crossfade
        join = int(SAMPLE_RATE * JOIN_CROSSFADE_MS / 1000)
        for index, w in enumerate(works):
            first = True
            # Only the request's first piece is small: later sentence chunks follow audio already playing.
            first_frames = min(first_chunk_frames, chunk_frames) if index == 0 else chunk_frames
            for piece, last in self._stream_chunk(w, chunk_frames, stats, first_frames):
                if first and held.size:
                    piece = crossfade_join(held, piece)
                    held = np.zeros(0, dtype=np.float32)
                first = False
                if last and index + 1 < len(works) and piece.size > join:
                    held, piece = piece[-join:], piece[:-join]
                if piece.size:
                    yield piece
        if held.size:
            yield held

    def _stream_chunk(self, work: _Work, chunk_frames: int, stats: dict,
                      first_frames: int | None = None) -> Iterator[tuple[np.ndarray, bool]]:
        import torch

        # The reference generation waits for a consumer that falls more than two pieces behind (its own
        # thread); the CUDA scheduler never waits (it serves every slot of its batch).
        events: queue.Queue[tuple[str, Any]] = queue.Queue(
            maxsize=2 * chunk_frames if self._graph_decoder is None else 0)
        cancel = threading.Event()
        eos = self._eos_id

        def put(event: tuple[str, Any]) -> None:
            while True:
                try:
                    events.put(event, timeout=0.1)
                    return
                except queue.Full:
                    if cancel.is_set():
                        raise GenerationCancelled() from None

        def sink(step: Any) -> None:
            if int(step[0, 0]) != eos:
                stats["frames_generated"] += 1
                put(("frame", step[0]))

        def run() -> None:
            try:
                try:
                    if self._graph_decoder is not None:
                        put(("done", self._graph_decoder.stream(work, sink, cancel)))
                    else:
                        put(("done", self._talker_generate([work], sink, cancel)[0]))
                except GenerationCancelled:
                    put(("done", None))
                except BaseException as exc:  # handed to the consumer, raised there
                    put(("error", exc))
            except GenerationCancelled:  # the consumer is gone: nobody to tell
                pass

        thread = threading.Thread(target=run, name=f"{self.name}-stream", daemon=True)
        thread.start()
        ctx = self._context(work)
        codes = ctx.clone()
        n_ctx = ctx.shape[0]
        emitted = n_ctx  # frames of `codes` already turned into audio
        tail = np.zeros(0, dtype=np.float32)  # end of the last piece, crossfaded with the next
        try:
            finished = False
            while not finished:
                kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "frame":
                    codes = torch.cat([codes, value.unsqueeze(0).long()], dim=0)
                    if codes.shape[0] - n_ctx > work.max_new_tokens:
                        codes = codes[: n_ctx + work.max_new_tokens]
                        stats["truncated"] = True
                        cancel.set()
                        finished = True
                    elif codes.shape[0] - emitted < (chunk_frames if emitted > n_ctx or first_frames is None
                                                     else first_frames):
                        continue
                else:
                    finished = True
                    if value is not None and value.shape[0] >= work.max_new_tokens - 1:
                        stats["truncated"] = True
                end = codes.shape[0]
                if end == emitted:
                    continue
                piece = self._decode_seam(codes, emitted, end, tail)
                emitted = end
                if finished:
                    yield self._check(piece) if piece.size else piece, True
                    tail = np.zeros(0, dtype=np.float32)
                else:
                    tail, piece = piece[-SEAM_CROSSFADE_SAMPLES:], piece[:-SEAM_CROSSFADE_SAMPLES]
                    yield piece, False
            if emitted == n_ctx:
                raise BackendError("synthesis_failed", "the model produced no audio")
        finally:
            cancel.set()
            thread.join(timeout=30)

    def _decode_seam(self, codes: Any, start: int, end: int, tail: np.ndarray) -> np.ndarray:
        """Decode frames [start, end) and crossfade the held tail of the previous piece into its head.

        The held tail covers the last samples before `start`; the new window decodes them again as part
        of its left context, so the two versions of the same audio are blended, not butted together.
        """
        if not tail.size or start < 1:
            return self._decode_window(codes, start, end)
        decoder = self.model.model.speech_tokenizer.model.decoder
        up = int(decoder.total_upsample)
        back = -(-tail.size // up)  # frames that hold the tail
        audio = self._decode_window(codes, start - back, end)
        overlap = audio[back * up - tail.size : back * up]
        return np.concatenate([crossfade_join(tail, overlap), audio[back * up :]])

    def prompt_cache_size_now(self) -> int:
        """How many voice prompts the cache holds."""
        with self._cache_lock:
            return len(self._prompts)
