"""Bodies of the public API, as the OpenAPI document shows them."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from timbre_common.audio import RESPONSE_FORMATS
from timbre_common.text import unstorable_characters


def _storable(value: str) -> str:
    problem = unstorable_characters(value)
    if problem:
        raise ValueError(problem)
    return value


# Text a client sends that ends up stored or forwarded: refused at the door when it cannot be stored.
Text = Annotated[str, AfterValidator(_storable)]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    backends: list[str] = Field(description="Backends this deployment can run right now")
    dependencies: dict[str, str] = Field(
        default_factory=dict, description="database, broker and each service the gateway calls: `ok` or why not")
    failing: list[str] = Field(default_factory=list, description="What makes the status `degraded`")


class Readiness(BaseModel):
    ready: bool
    dependencies: dict[str, str] = Field(description="The gateway's own dependencies: `ok` or why not")


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: Text | None = Field(default=None, max_length=200)
    account_id: Text | None = Field(default=None, description="Add the key to this existing account")
    rate_per_minute: int | None = Field(default=None, ge=1, le=100_000)
    max_concurrent: int | None = Field(default=None, ge=1, le=1000)


class UpdateKeyLimits(BaseModel):
    """Fields sent are changed; null puts the deployment default back."""

    model_config = ConfigDict(extra="forbid")
    rate_per_minute: int | None = Field(default=None, ge=1, le=100_000)
    max_concurrent: int | None = Field(default=None, ge=1, le=1000)


class KeyCreated(BaseModel):
    api_key: str = Field(description="Shown once; only its hash is kept")
    key_id: str
    account_id: str
    label: str | None
    created_at: datetime


class KeyInfo(BaseModel):
    key_id: str
    account_id: str
    key_prefix: str
    label: str | None
    created_at: datetime
    revoked_at: datetime | None
    rate_per_minute: int | None
    max_concurrent: int | None


class VoiceOut(BaseModel):
    voice_id: str
    name: str
    backend: str
    lang: str
    kind: Literal["system", "custom"]
    created_at: datetime
    ref_text: str | None = None
    family: str | None = None
    description: str | None = None
    quality: dict[str, Any] | None = Field(default=None, description="Reference-audio quality report")
    profile: dict[str, Any] | None = Field(default=None,
                                           description="Per-backend profile, e.g. the nearest bundled voice")
    metadata: dict[str, Any] = Field(default_factory=dict)


class VoiceSummary(BaseModel):
    voice_id: str
    name: str
    backend: str
    lang: str
    kind: Literal["system", "custom"]
    created_at: datetime


class SynthesizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    voice_id: Text = Field(max_length=100)
    text: Text
    lang: Text | None = Field(default=None, description="Defaults to the voice's language")
    backend: Text | None = Field(default=None, description="Defaults to the voice's backend")
    response_format: Literal[tuple(RESPONSE_FORMATS)] = "wav"  # type: ignore[valid-type]
    webhook_url: Text | None = Field(default=None, max_length=2048,
                                     description="A webhook endpoint registered with POST /v1/webhooks: this job's "
                                                 "job.ready or job.failed goes there")
    stream: bool = Field(default=False, description="Answer 200 with the audio as it is made (chunked), even "
                         "on a cache miss; the job is still created, stored and cached")
    timestamps: bool = Field(default=False, description="Record each word's start and end (seconds) on the job "
                             "(`words`); English only, other languages get an empty list")


class JobAccepted(BaseModel):
    job_id: str
    status: Literal["pending"]


class Word(BaseModel):
    word: str
    start: float = Field(description="Seconds from the start of the audio")
    end: float


class JobTimings(BaseModel):
    """Where a ready job's time went, in milliseconds (from created_at to completed_at)."""

    queued_ms: int = Field(description="Waiting for a worker: from creation until the synthesis began")
    synthesis_ms: int = Field(description="The worker synthesizing")
    stored_ms: int = Field(description="From the worker's result until storage had stored the audio")
    total_ms: int = Field(description="From creation until the job was ready")


def job_timings(job: dict) -> JobTimings | None:
    """A ready job's timings from its timestamps and the worker's own synthesis time; None when not recorded."""
    created, synthesized, stored, completed = (job.get(k) for k in ("created_at", "synthesized_at", "stored_at",
                                                                    "completed_at"))
    if None in (created, synthesized, stored, completed) or job.get("synthesis_ms") is None:
        return None

    def ms(a: datetime, b: datetime) -> int:
        return max(0, round((b - a).total_seconds() * 1000))

    synthesis = int(job["synthesis_ms"])
    return JobTimings(queued_ms=max(0, ms(created, synthesized) - synthesis), synthesis_ms=synthesis,
                      stored_ms=ms(synthesized, stored), total_ms=ms(created, completed))


class JobOut(BaseModel):
    job_id: str
    status: Literal["pending", "ready", "failed"]
    voice_id: str
    backend: str
    lang: str
    characters: int
    response_format: str
    created_at: datetime
    completed_at: datetime | None = None
    audio_url: str | None = Field(default=None, description="Presigned, valid 1 hour; only when ready")
    expires_at: datetime | None = Field(default=None, description="When the audio is deleted")
    error: str | None = None
    error_code: str | None = None
    synthesis_ms: int | None = None
    audio_seconds: float | None = None
    timings: JobTimings | None = Field(default=None, description="Where a ready job's time went")
    words: list[Word] | None = Field(default=None, description="Word timestamps, when asked for "
                                     "(`timestamps: true`); an empty list for a language that has none")


class CompletionCallback(BaseModel):
    job_id: str
    voice_id: str | None = None
    cache_key: str | None = None
    wav_b64: str | None = None
    error: str | None = None
    error_code: str | None = None
    synthesis_ms: int | None = Field(default=None, ge=0)
    audio_seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    rtf: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    words: list[Word] | None = Field(default=None, max_length=10_000)


class CallbackOutcome(BaseModel):
    status: Literal["accepted", "ignored"]


class UploadOut(BaseModel):
    upload_id: str
    purpose: str
    size: int
    content_type: str
    created_at: datetime
    expires_at: datetime | None
    url: str | None


class PurgeOut(BaseModel):
    purge_id: str
    account_id: str
    status: Literal["completed", "pending", "failed"] = Field(
        description="`failed`: some service never confirmed within the purge deadline (see `missing`)")
    confirmed: dict[str, int]
    missing: list[str] = Field(default_factory=list, description="Services that have not confirmed (yet)")
    failed_at: datetime | None = None
