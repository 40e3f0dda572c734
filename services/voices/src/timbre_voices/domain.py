"""The voice registry's rules: what a voice is and who may see it."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from timbre_common.catalogue import EMBEDDED_BACKEND, SYSTEM_VOICES, SystemVoice, system_voice_by_id
from timbre_common.contracts.voices import VoiceRecord

NAME_MAX = 200
FAMILY_MAX = 200
REF_TEXT_MAX = 2000
LIST_LIMIT_MAX = 500


def system_record(voice: SystemVoice) -> VoiceRecord:
    """The record every key sees for a bundled voice."""
    return VoiceRecord(
        voice_id=voice.voice_id, name=voice.name, backend=EMBEDDED_BACKEND, lang=voice.lang, kind="system",
        created_at=datetime(2026, 1, 1).astimezone(), description=voice.description,
        system_voice=voice.name, reference_key=f"voices/system/{voice.voice_id}.wav",
        metadata={"engine": voice.engine, "sample_rate": voice.sample_rate},
    )


def system_records() -> list[VoiceRecord]:
    return [system_record(v) for v in SYSTEM_VOICES]


def find_system_record(voice_id: str) -> VoiceRecord | None:
    voice = system_voice_by_id(voice_id)
    return system_record(voice) if voice else None


def custom_record(row: Any) -> VoiceRecord:
    """A database row as a client-facing record."""
    return VoiceRecord(
        voice_id=str(row["voice_id"]), name=row["name"], backend=row["backend"], lang=row["lang"], kind="custom",
        created_at=row["created_at"], ref_text=row["ref_text"], family=row["family"],
        reference_key=row["reference_key"], quality=row["quality"], profile=row["profile"] or None,
        metadata=row["metadata"] or {},
    )
