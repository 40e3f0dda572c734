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
