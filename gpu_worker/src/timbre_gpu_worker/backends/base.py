"""The interface every TTS backend of the GPU worker implements."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class BackendError(Exception):
    """A synthesis that cannot succeed for this request (bad input, unsupported language...).

    Not retried: the job ends `failed` with `reason`.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class BackendUnavailable(Exception):
    """The backend cannot run on this deployment (weights absent, no device)."""


ChunkSink = Callable[[np.ndarray, int, int, int], None]


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as 16-bit little-endian PCM (how pieces of a streamed job travel)."""
    return np.round(np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


@dataclass(frozen=True)
class SynthesisRequest:
    """One job as a backend sees it."""

    job_id: str
    text: str
    lang: str
    voice_id: str
    # Reference recording (any PCM WAV) for custom voices; None for system voices.
    reference_wav: bytes | None = None
    ref_text: str | None = None
    # Name of a bundled voice (system voices of the embedded backend).
    system_voice: str | None = None
    # Hints computed earlier for this voice (e.g. the embedded backend's nearest bundled voice).
    voice_profile: dict | None = None
    # Set for a streamed request: called (from the backend's thread) with each piece of audio as soon as it is
    # made, as on_chunk(samples, sample_rate, index, total). The pieces concatenate to the result's samples.
    # A backend that cannot stream ignores it; the transport then sends the whole result as one piece.
    on_chunk: ChunkSink | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SynthesisResult:
    """Mono float32 samples in [-1, 1] and what produced them."""

    samples: np.ndarray
    sample_rate: int
    details: dict = field(default_factory=dict)
    # True when every piece of the audio already went to the request's on_chunk.
    streamed: bool = False
    # The text's words with their times ({"word", "start", "end"}, seconds) when the model itself gives them.
    words: list[dict] | None = None

    @property
    def audio_seconds(self) -> float:
        return len(self.samples) / float(self.sample_rate)


class Backend(Protocol):
    """A TTS engine. Methods are synchronous: the worker runs them in a thread."""

    name: str
    languages: frozenset[str]

    def available(self) -> bool:
        """True when this deployment can run the backend (weights present, device usable)."""
        ...

    def load(self) -> None:
        """Load weights; idempotent."""
        ...

    def profile_voice(self, voice_id: str, reference_wav: bytes, ref_text: str | None) -> dict:
        """Precompute what the backend keeps per voice; returns a JSON-able summary."""
        ...

    def synthesize_batch(self, requests: Sequence[SynthesisRequest],
                         on_result: Callable[[int, SynthesisResult | BackendError], None] | None = None,
                         ) -> list[SynthesisResult | BackendError]:
        """Synthesize several requests together; one result or error per request, in order.

        `on_result(index, result)`, when given, is called from the backend's thread for each request as
        soon as it is done, so the caller can deliver it before the rest of the batch ends.
        """
        ...
