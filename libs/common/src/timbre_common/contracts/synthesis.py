"""Synthesis jobs: submission, the work order to GPU workers, and job outcomes."""
from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field

from .base import Command, Event, JobStatus, Reply, VoiceKind


class VoiceSnapshot(Reply):
    """What the dispatcher needs of a voice, copied at submission time."""

    TYPE: ClassVar[str] = "synthesis.voice_snapshot"
    voice_id: str
    backend: str
    lang: str
    kind: VoiceKind
    reference_key: str | None = None
    ref_text: str | None = None
    system_voice: str | None = None
    profile: dict[str, Any] | None = None


def cache_key(voice_id: str, text: str, lang: str, backend: str) -> str:
    """The synthesis cache key, sha256(voice_id \\0 text \\0 lang \\0 backend): the dispatcher's cache index and
    the gateway's read model of it are keyed by it, so both compute it here."""
    return hashlib.sha256("\x00".join((voice_id, text, lang, backend)).encode()).hexdigest()


class SubmitSynthesis(Command):
    TYPE: ClassVar[str] = "dispatch.submit"
    account_id: str
    voice: VoiceSnapshot
    text: str
    lang: str
    backend: str
    response_format: str = "wav"
    # Billing's quota hold for these characters; the job carries it to job.ready / job.failed.
    hold_id: str | None = None
    # A streamed request: the gateway instance's stream queue and the stream's id there. A streamed request
    # never joins a job in flight (that job's pieces go to another connection); it makes its own.
    stream_to: str | None = None
    stream_id: str | None = None
    # Word timestamps asked for: the job records them (English only), and a cache entry without them is no hit.
    timestamps: bool = False


class SynthesisAccepted(Reply):
    """A cache hit (binary body holds the WAV) or a new pending job."""

    TYPE: ClassVar[str] = "dispatch.accepted"
    BINARY: ClassVar[bool] = True
    cache_hit: bool
    job_id: str | None = None
    status: JobStatus = "pending"
    cache_key: str
    synthesis_ms: int = -1
    expires_at: datetime | None = None
    # True when a new job took the submission's hold_id; otherwise the caller releases the hold.
    hold_attached: bool = False
    # A cache hit's body is already in the requested format (encoded once, kept by storage): its media type.
    content_type: str | None = None


class GetJob(Command):
    TYPE: ClassVar[str] = "dispatch.get_job"
    account_id: str
    job_id: str


class JobView(Reply):
    TYPE: ClassVar[str] = "dispatch.job"
    job_id: str
    voice_id: str
    status: JobStatus
    backend: str
    lang: str
    characters: int
    response_format: str = "wav"
    created_at: datetime
    completed_at: datetime | None = None
    audio_url: str | None = None
    expires_at: datetime | None = None
    error: str | None = None
    error_code: str | None = None
    synthesis_ms: int | None = None
    audio_seconds: float | None = None
    # Set on FetchJobAudio's reply: the media type of the binary body (the format asked for).
    content_type: str | None = None
    # Word timestamps ({"word", "start", "end"}, seconds) when they were asked for and the language has them.
    words: list[dict[str, Any]] | None = None
    # When the worker announced the audio, and when storage had stored it (ready jobs).
    synthesized_at: datetime | None = None
    stored_at: datetime | None = None


class FetchJobAudio(Command):
    """A ready job's audio as the binary body of the reply (JobView), in `response_format` (default: the job's)."""

    TYPE: ClassVar[str] = "dispatch.fetch_audio"
    account_id: str
    job_id: str
    response_format: str | None = None


class LookupJob(Command):
    """Internal (the completion callback): a job by id alone, whoever owns it."""

    TYPE: ClassVar[str] = "dispatch.lookup_job"
    job_id: str


class JobOwner(Reply):
    TYPE: ClassVar[str] = "dispatch.job_owner"
    job_id: str
    account_id: str
    voice_id: str
    backend: str
    status: JobStatus
    created_at: datetime
    # The attempt now handed out: a remote callback for another one is stale.
    attempt: int | None = None
    # The job's current attempt: a work order of an older one is superseded.
    attempts: int = 1


class PurgeVoiceJobs(Command):
    TYPE: ClassVar[str] = "dispatch.purge_voice"
    account_id: str
    voice_id: str


class SynthesisRequested(Event):
    """The work order for a GPU worker (consumed by the local worker or the Modal executor)."""

    TYPE: ClassVar[str] = "synthesis.requested"
    job_id: str
    account_id: str
    voice_id: str
    text: str
    lang: str
    backend: str
    attempt: int = 1
    cache_key: str
    job_created_at: datetime | None = None
    reference_url: str | None = None
    ref_text: str | None = None
    system_voice: str | None = None
    voice_profile: dict[str, Any] | None = None
    # Where to send the audio pieces as they are made (a gateway instance's stream queue), when streamed.
    stream_to: str | None = None
    stream_id: str | None = None
    # Word timestamps wanted (put in the completion's details as "words", and on the final streamed piece).
    timestamps: bool = False


class SynthesisChunk(Event):
    """One piece of a streamed synthesis, worker -> the gateway instance holding the client's connection.

    The body is mono 16-bit little-endian PCM at `sample_rate`; pieces concatenate to the job's whole audio.
    `seq` counts from 0 within an attempt; the piece with `final` is the last. A piece with `error_code` set
    (and an empty body) says the attempt failed and no more pieces follow.
    """

    TYPE: ClassVar[str] = "synthesis.chunk"
    BINARY: ClassVar[bool] = True
    job_id: str
    stream_id: str
    attempt: int = 1
    seq: int
    final: bool = False
    sample_rate: int = 0
    # How many pieces this attempt will send in all, when the worker knows it up front (the embedded voices).
    total: int | None = None
    error_code: str | None = None
    error: str | None = None
    # On the final piece, when word timestamps were asked for: every word of the job.
    words: list[dict[str, Any]] | None = None


class SynthesisCompleted(Event):
    """A worker's result: the WAV is the binary body."""

    TYPE: ClassVar[str] = "synthesis.completed"
    BINARY: ClassVar[bool] = True
    job_id: str
    account_id: str
    voice_id: str
    backend: str
    sample_rate: int
    audio_seconds: float
    synthesis_ms: int
    rtf: float
    job_created_at: datetime | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class SynthesisFailed(Event):
    TYPE: ClassVar[str] = "synthesis.failed"
    job_id: str
    account_id: str
    code: str
    reason: str
    retryable: bool = False
    # The attempt that failed; a failure of an attempt older than the job's latest is stale and ignored.
    attempt: int | None = None


class JobReady(Event):
    TYPE: ClassVar[str] = "job.ready"
    job_id: str
    account_id: str
    voice_id: str
    backend: str
    characters: int
    audio_key: str
    expires_at: datetime | None = None
    hold_id: str | None = None
    # What a gateway's read models need to answer a cache hit, a poll and a download without asking (all
    # optional: an older dispatcher's event still decodes, and a gateway then asks as before).
    cache_key: str | None = None
    lang: str | None = None
    response_format: str | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None
    synthesis_ms: int | None = None
    audio_seconds: float | None = None
    has_words: bool = False
    synthesized_at: datetime | None = None
    stored_at: datetime | None = None


class JobFailed(Event):
    TYPE: ClassVar[str] = "job.failed"
    job_id: str
    account_id: str
    code: str
    reason: str
    hold_id: str | None = None


class WorkerHeartbeat(Event):
    """A worker (or the Modal executor) says which backends it can run right now."""

    TYPE: ClassVar[str] = "worker.heartbeat"
    worker_id: str
    backends: list[str]
    executor: str = "local"
    interval_s: float = 10.0
