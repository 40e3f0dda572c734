"""Typed resources of the Timbre API. Unknown fields a newer API adds are kept, not refused."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Health(Model):
    status: str
    backends: list[str] = Field(default_factory=list)


class Voice(Model):
    voice_id: str
    name: str
    backend: str
    lang: str
    kind: Literal["system", "custom"] | str
    created_at: datetime | None = None
    ref_text: str | None = None
    family: str | None = None
    description: str | None = None
    quality: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


JobStatus = Literal["pending", "ready", "failed"]


class Job(Model):
    job_id: str
    status: JobStatus | str
    voice_id: str | None = None
    backend: str | None = None
    lang: str | None = None
    characters: int | None = None
    response_format: str | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None
    audio_url: str | None = None
    expires_at: datetime | None = None
    error: str | None = None
    error_code: str | None = None
    synthesis_ms: int | None = None
    audio_seconds: float | None = None

    @property
    def done(self) -> bool:
        return self.status in ("ready", "failed")


class Audio(Model):
    """Audio the API sent: a cache hit of `speech.create`, or a ready job's `jobs.audio`."""

    content: bytes = Field(repr=False)
    content_type: str
    job_id: str | None = None
    voice_id: str | None = None
    backend: str | None = None
    cache: Literal["HIT", "MISS"] | None = None
    expires_at: datetime | None = None

    def save(self, path: str | Path) -> Path:
        """Write the audio to `path`; returns it."""
        target = Path(path)
        target.write_bytes(self.content)
        return target


class Upload(Model):
    upload_id: str
    purpose: str
    size: int
    content_type: str
    created_at: datetime
    expires_at: datetime | None = None
    url: str | None = None


class Usage(Model):
    account_id: str
    period_start: datetime
    period_end: datetime
    characters_used: int
    jobs: int = 0
    quota: int | None = None
    remaining: int | None = None
    billing: str = "off"


class Purge(Model):
    purge_id: str
    account_id: str
    status: Literal["pending", "completed"] | str
    confirmed: dict[str, Any] = Field(default_factory=dict)


class ApiKey(Model):
    key_id: str
    account_id: str
    key_prefix: str | None = None
    label: str | None = None
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    rate_per_minute: int | None = None
    max_concurrent: int | None = None


class ApiKeyCreated(Model):
    api_key: str = Field(repr=False)
    key_id: str
    account_id: str
    label: str | None = None
    created_at: datetime | None = None


WebhookEventType = Literal["job.ready", "job.failed", "voice.deleted", "account.purged"]


class Webhook(Model):
    webhook_id: str
    url: str
    events: list[str]
    description: str | None = None
    created_at: datetime | None = None
    previous_secret_expires_at: datetime | None = None


class WebhookCreated(Webhook):
    secret: str = Field(repr=False)


class DeliveryAttempt(Model):
    attempt: int
    started_at: datetime
    duration_ms: int
    status_code: int | None = None
    error: str | None = None
    response: str | None = None


class WebhookDelivery(Model):
    delivery_id: str
    event_id: str
    event_type: str
    status: Literal["pending", "delivered", "parked"] | str
    attempts: int
    next_attempt_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None
    created_at: datetime
    completed_at: datetime | None = None
    attempt_log: list[DeliveryAttempt] = Field(default_factory=list)


class WebhookEvent(Model):
    """What a webhook delivers: `{"id", "type", "created_at", "data"}`."""

    id: str
    type: str
    created_at: datetime
    data: dict[str, Any] = Field(default_factory=dict)
