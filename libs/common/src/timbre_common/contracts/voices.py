"""Voice registry: commands to the voices service and the events it emits."""
from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field

from .base import Command, Event, Reply, VoiceKind


class VoiceRecord(Reply):
    """A voice as clients see it (never any key hash)."""

    TYPE: ClassVar[str] = "voices.record"
    voice_id: str
    name: str
    backend: str
    lang: str
    kind: VoiceKind
    created_at: datetime
    ref_text: str | None = None
    family: str | None = None
    description: str | None = None
    reference_key: str | None = None
    system_voice: str | None = None
    quality: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class VoiceList(Reply):
    TYPE: ClassVar[str] = "voices.list"
    voices: list[VoiceRecord]
    # The cursor of the next page of custom voices; None on the last.
    next_after: str | None = None


class RegisterVoice(Command):
    """Create a custom voice; the reference WAV is the binary body, or an earlier upload is named."""

    TYPE: ClassVar[str] = "voices.register"
    BINARY: ClassVar[bool] = True
    account_id: str
    name: str
    backend: str
    lang: str = "en"
    ref_text: str | None = None
    family: str | None = None
    upload_id: str | None = None


class ListVoices(Command):
    """A page of the account's custom voices (system voices lead the first page and do not count)."""

    TYPE: ClassVar[str] = "voices.list_voices"
    account_id: str
    limit: int = 100
    after: str | None = None  # the last voice of the previous page


class GetVoice(Command):
    TYPE: ClassVar[str] = "voices.get"
    account_id: str
    voice_id: str


class DeleteVoice(Command):
    TYPE: ClassVar[str] = "voices.delete"
    account_id: str
    voice_id: str


class VoiceRegistered(Event):
    """A custom voice exists; workers may precompute what they keep per voice."""

    TYPE: ClassVar[str] = "voice.registered"
    voice_id: str
    account_id: str
    backend: str
    lang: str
    reference_key: str
    reference_url: str
    ref_text: str | None = None


class VoiceProfiled(Event):
    """A worker computed a voice's per-backend profile (e.g. the nearest bundled voice)."""

    TYPE: ClassVar[str] = "voice.profiled"
    voice_id: str
    account_id: str
    backend: str
    profile: dict[str, Any]


class VoiceDeleted(Event):
    TYPE: ClassVar[str] = "voice.deleted"
    voice_id: str
    account_id: str
    reference_key: str | None = None
