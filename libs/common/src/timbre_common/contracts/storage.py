"""The bucket: commands to the storage service and the events it emits."""
from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field

from .base import Command, Event, Reply, UploadPurposeName


class StoredObject(Reply):
    TYPE: ClassVar[str] = "storage.object"
    key: str
    size: int
    content_type: str = "audio/wav"
    expires_at: datetime | None = None
    retention: str | None = None


class PutVoiceReference(Command):
    """Store a voice's reference WAV (binary body); account_id None for system voices."""

    TYPE: ClassVar[str] = "storage.put_voice_reference"
    BINARY: ClassVar[bool] = True
    account_id: str | None = None
    voice_id: str
    # The voice_clone upload the reference was made from: the voice claims it, so it does not expire.
    upload_id: str | None = None


class PutUpload(Command):
    TYPE: ClassVar[str] = "storage.put_upload"
    BINARY: ClassVar[bool] = True
    account_id: str
    upload_id: str
    purpose: str | None = None
    content_type: str = "application/octet-stream"
    filename: str | None = None


class UploadRecord(Reply):
    TYPE: ClassVar[str] = "storage.upload"
    upload_id: str
    purpose: UploadPurposeName
    key: str
    size: int
    content_type: str
    created_at: datetime
    expires_at: datetime | None = None
    url: str | None = None


class GetUpload(Command):
    """An upload's record; with `with_body` its bytes as the binary body of the reply."""

    TYPE: ClassVar[str] = "storage.get_upload"
    account_id: str
    upload_id: str
    with_body: bool = False


class GetObject(Command):
    """An object's bytes as the binary body of the reply (StoredObject), for the account that owns it; None reaches
    system objects only. Another account's object is `object_not_found`."""

    TYPE: ClassVar[str] = "storage.get_object"
    key: str
    account_id: str | None = None


class GetRendition(Command):
    """A generated audio object in a response format, as the binary body of the reply (StoredObject).

    The first request of a format encodes it and keeps it beside the source, with the source's expiry; later
    ones read it back. Deleting or expiring the source takes its renditions with it.
    """

    TYPE: ClassVar[str] = "storage.get_rendition"
    account_id: str
    key: str
    format: str


class Presign(Command):
    """A download URL, on the same terms as GetObject."""

    TYPE: ClassVar[str] = "storage.presign"
    key: str
    account_id: str | None = None
    expires_in: int = 3600


class PresignedUrl(Reply):
    TYPE: ClassVar[str] = "storage.presigned_url"
    url: str
    url_expires_at: datetime
    object_expires_at: datetime | None = None


class AudioStored(Event):
    TYPE: ClassVar[str] = "audio.stored"
    job_id: str
    account_id: str
    key: str
    size: int
    expires_at: datetime | None = None
    synthesis_ms: int | None = None
    audio_seconds: float | None = None
    # The synthesis's word timestamps, passed on from synthesis.completed for the job to keep.
    words: list[dict[str, Any]] | None = None
    # When the worker announced the audio (synthesis.completed) and when storage had stored it.
    synthesized_at: datetime | None = None
    stored_at: datetime | None = None


class ObjectsExpired(Event):
    """The sweeper removed these objects; owners drop what pointed at them."""

    TYPE: ClassVar[str] = "objects.expired"
    keys: list[str]


class ObjectsReleased(Event):
    """An owner no longer needs these objects; storage deletes them."""

    TYPE: ClassVar[str] = "objects.released"
    account_id: str | None = None
    keys: list[str] = Field(default_factory=list)
