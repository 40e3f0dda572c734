"""What Timbre offers everywhere: the backends and the system voices (bundled voices every API key can use).

Voice ids are uuid5 values under a fixed Timbre namespace, so every deployment (and every service that
imports this module) agrees on them without a database.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

# Fixed forever: changing it would change every system voice id that clients have stored.
TIMBRE_VOICE_NAMESPACE = uuid.UUID("6f1c2a57-3c0e-5b7e-9a43-1d7c0b5e2f10")

Engine = Literal["piper", "hibari"]


def system_voice_id(engine: str, name: str) -> str:
    """The stable id of a bundled voice."""
    return str(uuid.uuid5(TIMBRE_VOICE_NAMESPACE, f"system-voice/{engine}/{name}"))


@dataclass(frozen=True)
class SystemVoice:
    """A voice whose weights ship with the worker."""

    voice_id: str
    name: str
    engine: Engine
    lang: str
    description: str
    sample_rate: int


SYSTEM_VOICES: tuple[SystemVoice, ...] = (
    SystemVoice(
        voice_id=system_voice_id("piper", "joe"),
        name="joe",
        engine="piper",
        lang="en",
        description="American English, male (Piper en_US-joe-medium)",
        sample_rate=22050,
    ),
    SystemVoice(
        voice_id=system_voice_id("hibari", "heart"),
        name="heart",
        engine="hibari",
        lang="en",
        description="American English, female (hibari, distilled from Kokoro af_heart)",
        sample_rate=24000,
    ),
)

_BY_ID = {v.voice_id: v for v in SYSTEM_VOICES}
_BY_NAME = {v.name: v for v in SYSTEM_VOICES}


def system_voice_by_id(voice_id: str) -> SystemVoice | None:
    """The system voice with this id, or None."""
    return _BY_ID.get(voice_id)


def system_voice_by_name(name: str) -> SystemVoice | None:
    """The system voice with this name, or None."""
    return _BY_NAME.get(name)


# Every backend name a request may carry; which of them this deployment runs is advertised live by workers.
EMBEDDED_BACKEND = "embedded"
QWEN3_BACKENDS: tuple[str, ...] = ("qwen3-1.7b", "qwen3-0.6b")
KNOWN_BACKENDS: tuple[str, ...] = (*QWEN3_BACKENDS, EMBEDDED_BACKEND)
# Asked for by a client that names no backend, the first advertised wins.
BACKEND_PREFERENCE: tuple[str, ...] = KNOWN_BACKENDS
ALL_LANGUAGES: tuple[str, ...] = ("en", "zh", "ja", "ko", "es", "fr", "de", "it", "pt", "ru")
# The bundled CPU voices speak English only; the Qwen3 models speak every supported language.
BACKEND_LANGUAGES: dict[str, tuple[str, ...]] = {
    EMBEDDED_BACKEND: ("en",),
    **{name: ALL_LANGUAGES for name in QWEN3_BACKENDS},
}

# How long a job may take, from its length: wall seconds per character of text and a floor, per backend.
# One figure for everything that waits on a synthesis: the dispatcher's job deadline (after which the job
# is handed out again), the Modal call timeout and the worker's batch timeout. Set from the slowest decode
# a deployment may run, with a margin: the Qwen3 reference decode on a GPU runs at about 0.44x real time,
# ~0.15 s per character at ~15 characters per second of speech, doubled here; the embedded CPU voices run
# at 0.02-0.08 RTF.
SYNTHESIS_SECONDS_PER_CHAR: dict[str, float] = {EMBEDDED_BACKEND: 0.02, "qwen3-0.6b": 0.3, "qwen3-1.7b": 0.4}
SYNTHESIS_FLOOR_S: dict[str, float] = {EMBEDDED_BACKEND: 30.0, "qwen3-0.6b": 60.0, "qwen3-1.7b": 90.0}
_DEFAULT_SECONDS_PER_CHAR = 0.4
_DEFAULT_FLOOR_S = 90.0


def expected_synthesis_seconds(backend: str, chars: int) -> float:
    """Seconds a synthesis of `chars` characters on `backend` may take before it is presumed lost."""
    rate = SYNTHESIS_SECONDS_PER_CHAR.get(backend, _DEFAULT_SECONDS_PER_CHAR)
    floor = SYNTHESIS_FLOOR_S.get(backend, _DEFAULT_FLOOR_S)
    return max(floor, max(0, chars) * rate)
