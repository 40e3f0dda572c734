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


@dataclass(frozen=True)
class SynthesisResult:
    """Mono float32 samples in [-1, 1] and what produced them."""

    samples: np.ndarray
    sample_rate: int
    details: dict = field(default_factory=dict)

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
