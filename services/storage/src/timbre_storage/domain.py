"""Storage domain: key layout, retention classes and id guards (pure, no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

# Ids become path segments: one segment of safe characters, never "." or "..", never "/".
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_EXT_RE = re.compile(r"^[a-z0-9]{1,8}$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,254}$")


class StorageError(Exception):
    """Base class of the storage domain errors."""


class InvalidId(StorageError, ValueError):
    """An id, extension or key that could escape its prefix or is malformed."""


class InvalidPurpose(StorageError, ValueError):
    """An upload purpose Timbre does not know."""


class ObjectMissing(StorageError, LookupError):
    """The object is not in the index or not in the bucket."""


class ObjectExpired(ObjectMissing):
    """The object's retention ran out: gone for its owner, deleted from the bucket at the next sweep."""


class QuotaExceeded(StorageError):
    """The account's storage caps refuse this write; `code` and `status` are what the client gets."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass(frozen=True, slots=True)
class AccountLimits:
    """What one account may keep: live uploads, and bytes of uploads plus custom voice references.

    A voice_clone upload lives `voice_clone_ttl` unless a voice claims it."""

    max_uploads: int = 1000
    max_bytes: int = 1024 * 1024 * 1024
    voice_clone_ttl: timedelta = timedelta(hours=24)

    def check(self, *, uploads: int, stored_bytes: int, adding_bytes: int, adding_upload: bool) -> None:
        """Raise QuotaExceeded when the write would pass a cap."""
        if adding_upload and uploads >= self.max_uploads:
            raise QuotaExceeded("upload_limit_reached",
                                f"this account keeps {uploads} uploads, its limit; delete voices or wait for "
                                "unused uploads to expire", 409)
        if stored_bytes + adding_bytes > self.max_bytes:
            raise QuotaExceeded("storage_quota_exceeded",
                                f"this account stores {stored_bytes} bytes of uploads and voices; {adding_bytes} "
                                f"more would pass its limit of {self.max_bytes}", 413)


class RetentionClass(StrEnum):
    """How long an object is kept (seed 001)."""

    TTS_AUDIO = "tts_audio"
    VOICE_REFERENCE = "voice_reference"
    BUILT_VOICE = "built_voice"
    UPLOAD = "upload"
    STT_INPUT = "stt_input"
    WATERMARK_INPUT = "watermark_input"
    AUDIO_JOB_INPUT = "audio_job_input"
    VOICE_CLONE = "voice_clone"

    @property
    def lifetime(self) -> timedelta | None:
        """Time to live, or None for permanent objects."""
        return _LIFETIMES[self]

    @property
    def permanent(self) -> bool:
        """True when objects of this class never expire."""
        return _LIFETIMES[self] is None


_LIFETIMES: dict[RetentionClass, timedelta | None] = {
    RetentionClass.TTS_AUDIO: timedelta(days=7),
    RetentionClass.VOICE_REFERENCE: None,
    RetentionClass.BUILT_VOICE: None,
    RetentionClass.UPLOAD: timedelta(days=30),
    RetentionClass.STT_INPUT: timedelta(days=30),
    RetentionClass.WATERMARK_INPUT: timedelta(days=30),
    RetentionClass.AUDIO_JOB_INPUT: timedelta(days=30),
    # Until a voice claims it (AccountLimits.voice_clone_ttl is the configured lifetime); claimed, permanent.
    RetentionClass.VOICE_CLONE: timedelta(hours=24),
}


class UploadPurpose(StrEnum):
    """Why a client uploaded a file; decides prefix and retention."""

    UPLOAD = "upload"
    STT_INPUT = "stt_input"
    WATERMARK_INPUT = "watermark_input"
    AUDIO_JOB_INPUT = "audio_job_input"
    VOICE_CLONE = "voice_clone"

    @property
    def retention(self) -> RetentionClass:
        """Retention class of an upload with this purpose."""
        return RetentionClass(self.value)

    @classmethod
    def parse(cls, value: UploadPurpose | str | None) -> UploadPurpose:
        """The purpose named by a client; None or "" means a generic upload."""
        if value is None or value == "":
            return cls.UPLOAD
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(p.value for p in cls)
            raise InvalidPurpose(f"unknown upload purpose {value!r} (allowed: {allowed})") from None


class ObjectKind(StrEnum):
    """What an object is, recorded in the index."""

    GENERATION = "generation"
    SYSTEM_VOICE = "system_voice"
    CUSTOM_VOICE = "custom_voice"
    UPLOAD = "upload"
    VOICE_RECORDING = "voice_recording"


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object of the bucket as the index knows it."""

    key: str
    size: int
    expires_at: datetime | None
    account_id: str | None = None
    kind: ObjectKind = ObjectKind.UPLOAD
    retention: RetentionClass = RetentionClass.UPLOAD
    content_type: str = "application/octet-stream"
    created_at: datetime | None = None
    owner_ref: str | None = None


_CONTENT_TYPE_EXT = {
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/vnd.wave": "wav",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/mp4": "m4a",
    "audio/x-m4a": "m4a",
    "audio/aac": "aac",
    "audio/ogg": "ogg",
    "audio/opus": "opus",
    "audio/webm": "webm",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
}


def check_id(value: str, what: str = "id") -> str:
    """Return the id when it is one safe path segment, else raise InvalidId."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidId(f"invalid {what}: {value!r} (allowed: letters, digits, '-', '_'; max 128)")
    return value


def check_ext(ext: str) -> str:
    """Return a lower-case file extension without dot, else raise InvalidId."""
    if not isinstance(ext, str) or not _EXT_RE.fullmatch(ext):
        raise InvalidId(f"invalid extension: {ext!r}")
    return ext


def check_key(key: str) -> str:
    """Return the key when every segment is safe (no '..', no empty or hidden segment)."""
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise InvalidId(f"invalid key: {key!r}")
    for segment in key.split("/"):
        if not _SEGMENT_RE.fullmatch(segment) or segment in (".", ".."):
            raise InvalidId(f"invalid key: {key!r}")
    return key


def ext_for_content_type(content_type: str) -> str:
    """File extension for a MIME type (the gateway sniffs it from the bytes), else 'bin'; never the client's
    file name."""
    return _CONTENT_TYPE_EXT.get(content_type.split(";", 1)[0].strip().lower()) or "bin"


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC)


def _dated(prefix: str, account_id: str, at: datetime, ident: str, ext: str) -> str:
    at = _utc(at)
    return (
        f"{prefix}/{check_id(account_id, 'account_id')}/{at:%Y/%m/%d}/"
        f"{at:%H%M%S}-{ident}.{check_ext(ext)}"
    )


def system_voice_key(voice_id: str) -> str:
    """Key of a bundled (system) voice's reference audio."""
    return f"voices/system/{check_id(voice_id, 'voice_id')}.wav"


def custom_voice_key(account_id: str, voice_id: str) -> str:
    """Key of an account's custom voice reference audio."""
    return f"voices/custom/{check_id(account_id, 'account_id')}/{check_id(voice_id, 'voice_id')}.wav"


def voice_key(account_id: str | None, voice_id: str) -> str:
    """Key of a voice reference: system when account_id is None, else custom."""
    return system_voice_key(voice_id) if account_id is None else custom_voice_key(account_id, voice_id)


def generation_key(account_id: str, job_id: str, created_at: datetime, ext: str = "wav") -> str:
    """Key of a job's generated audio, stamped with the job's creation time so retries agree."""
    return _dated("generations", account_id, created_at, check_id(job_id, "job_id"), ext)


def upload_key(account_id: str, upload_id: str, purpose: UploadPurpose, created_at: datetime, ext: str) -> str:
    """Key of an upload; voice-clone recordings go under the permanent voice-recordings/ prefix."""
    prefix = "voice-recordings" if purpose is UploadPurpose.VOICE_CLONE else "uploads"
    return _dated(prefix, account_id, created_at, check_id(upload_id, "upload_id"), ext)


# Formats a generation is handed out in besides its WAV, each encoded once and kept beside it (same stem).
RENDITION_FORMATS = ("mp3", "opus", "flac", "pcm")


def rendition_key(source_key: str, fmt: str) -> str:
    """Key of a generated WAV's rendition in another response format."""
    if fmt not in RENDITION_FORMATS or not source_key.endswith(".wav"):
        raise InvalidId(f"no {fmt!r} rendition of {source_key!r}")
    return f"{source_key[: -len('.wav')]}.{fmt}"


def renditions_of(key: str) -> list[str]:
    """The rendition keys that go with a generated WAV (none for any other key)."""
    if not (key.startswith("generations/") and key.endswith(".wav")):
        return []
    return [rendition_key(key, fmt) for fmt in RENDITION_FORMATS]


def account_prefixes(account_id: str) -> list[str]:
    """Every bucket prefix that holds objects of the account (trailing '/' so 'ab' never matches 'abc')."""
    account_id = check_id(account_id, "account_id")
    return [
        f"voices/custom/{account_id}/",
        f"generations/{account_id}/",
        f"uploads/{account_id}/",
        f"voice-recordings/{account_id}/",
    ]


def expires_at(cls: RetentionClass, now: datetime) -> datetime | None:
    """When an object of this class stored at `now` expires; None if permanent."""
    lifetime = cls.lifetime
    return None if lifetime is None else _utc(now) + lifetime
