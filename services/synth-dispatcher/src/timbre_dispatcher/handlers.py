"""Synthesis dispatcher handlers.

Serves (RPC): SubmitSynthesis, GetJob, FetchJobAudio, LookupJob, PurgeVoiceJobs.
Consumes: audio.stored, synthesis.failed, objects.expired, voice.deleted, account.purge_requested.
Emits: synthesis.requested (the work order), job.ready, job.failed, objects.released, account.purged.
Calls: storage (GetRendition, Presign).
Timers (bootstrap): sweep_overdue (deadlines), sweep_finished (job retention).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from timbre_common import metrics
from timbre_common.catalogue import expected_synthesis_seconds
from timbre_common.contracts import Envelope
from timbre_common.contracts.accounts import AccountPurged, AccountPurgeRequested
from timbre_common.contracts.storage import (
    AudioStored,
    GetRendition,
    ObjectsExpired,
    ObjectsReleased,
    Presign,
    PresignedUrl,
    StoredObject,
)
from timbre_common.contracts.synthesis import (
    FetchJobAudio,
    GetJob,
    JobFailed,
    JobOwner,
    JobReady,
    JobView,
    LookupJob,
    PurgeVoiceJobs,
    SubmitSynthesis,
    SynthesisAccepted,
    SynthesisFailed,
    SynthesisRequested,
)
from timbre_common.contracts.voices import VoiceDeleted
from timbre_common.ids import is_canonical_uuid
from timbre_common.logging import get_logger, scrub_urls
from timbre_common.messaging import NotFound, PublishRefused, RemoteError, RpcError, work_routing_key
from timbre_common.ports import MessageBus

from . import domain
from .adapters.repository import CacheIndex, JobRepository

log = get_logger(__name__)


def _job_finished(row: Any, outcome: str) -> None:
    """Count a job's terminal transition; a ready one's latency from creation, per backend."""
    backend = row.get("backend") or "unknown"
    metrics.JOBS_FINISHED.labels(backend, outcome).inc()
    created, completed = row.get("created_at"), row.get("completed_at")
    if outcome == "ready" and created is not None and completed is not None:
        metrics.JOB_LATENCY.labels(backend).observe(max(0.0, (completed - created).total_seconds()))


@dataclass(frozen=True)
class JobPolicy:
    # The least time an attempt gets; a long text gets its characters times its backend's rate.
    deadline_s: float = 300.0
    max_attempts: int = 3
    reference_url_ttl_s: int = 3600
    deadline_per_char_s: dict[str, float] = field(default_factory=dict)
    # Pending jobs one account may have; None: no cap.
    max_pending_per_account: int | None = None

    def deadline_for(self, backend: str, characters: int) -> float:
        """Seconds an attempt of a job of this length on this backend may take before it is sent again.

        Never less than the time the worker's batch and a Modal call are given for the same text (the one
        figure of `catalogue.expected_synthesis_seconds`), plus a minute for queueing and delivery: an attempt
        still within its time is never sent twice."""
        return max(self.deadline_s, characters * self.deadline_per_char_s.get(backend, 0.0),
                   expected_synthesis_seconds(backend, characters) + DELIVERY_SLACK_S)


# Beyond the synthesis itself: waiting in the work queue, storing, announcing.
DELIVERY_SLACK_S = 60.0


class WorkQueueFull(RpcError):
    """The backend's work queue refused the work order: too much is waiting already."""

    status = 503

    def __init__(self, backend: str) -> None:
        super().__init__("work_queue_full", f"the {backend} backend has too much work waiting; retry later",
                         details={"retry_after_s": 30})


# What storage answers for an object its owner can no longer have.
_GONE = ("object_not_found", "object_expired")
_EXPIRED = ("audio_expired", "audio expired and was deleted")
_MISSING = ("audio_missing", "audio missing from storage")


def _job_not_found(job_id: str) -> NotFound:
    return NotFound("job_not_found", f"job {job_id} not found")


async def _work_order(row: Any, *, bus: MessageBus, policy: JobPolicy) -> SynthesisRequested:
    """The job's stored request with a fresh presigned reference URL and its attempt number."""
    request = dict(row["request"])
    reference_key = request.pop("reference_key", None)
    reference_url = None
    if reference_key:
        url, _ = await bus.call("storage", Presign(key=reference_key, account_id=row["account_id"],
                                                   expires_in=policy.reference_url_ttl_s), expect=PresignedUrl)
        reference_url = url.url
    return SynthesisRequested(job_id=str(row["job_id"]), account_id=row["account_id"], voice_id=row["voice_id"],
                              text=row["text"], lang=row["lang"], backend=row["backend"], attempt=row["attempts"],
                              cache_key=row["cache_key"], job_created_at=row["created_at"],
                              reference_url=reference_url, **request)


async def _hand_out(order: SynthesisRequested, *, bus: MessageBus) -> None:
    """Publish the work order on its backend's route; the message id makes each attempt distinct.

    Straight to the broker, not through the outbox: a full work queue must refuse this request now (and not
    hold up every event behind it in the relay), and a lost publish is repaired by the deadline sweep."""
    publish = getattr(bus, "publish_now", bus.publish)
    try:
        await publish(order, message_id=f"{order.job_id}:{order.attempt}",
                      routing_key=work_routing_key(order.backend))
    except PublishRefused as exc:
        raise WorkQueueFull(order.backend) from exc


async def _dispatch(row: Any, *, jobs: JobRepository, bus: MessageBus, policy: JobPolicy) -> bool:
    """Hand the job out; one whose reference audio is gone fails now, as no attempt could ever run it."""
    try:
        order = await _work_order(row, bus=bus, policy=policy)
    except RemoteError as exc:
        if exc.code not in _GONE:
            raise
        await _fail(str(row["job_id"]), row["account_id"], "reference_missing",
                    "the voice's reference audio is missing from storage", jobs=jobs, bus=bus)
        return False
    await _hand_out(order, bus=bus)
    return True


async def submit(cmd: SubmitSynthesis, *, envelope: Envelope, jobs: JobRepository, cache: CacheIndex,
                 bus: MessageBus, policy: JobPolicy) -> SynthesisAccepted | tuple[SynthesisAccepted, bytes]:
    """Answer from the cache, join an identical job in flight, or create a job and hand it out."""
    key = domain.cache_key(cmd.voice.voice_id, cmd.text, cmd.lang, cmd.backend)
    entry = await cache.get(cmd.account_id, key)
    if entry is not None and cmd.timestamps and not await jobs.has_words(str(entry["job_id"])):
        entry = None  # audio made without word timestamps: make it again, with them
    if entry is not None:
        started = time.perf_counter()
        try:
            # In the format asked for: storage encodes a format once per job and keeps it. A streamed hit is cut
            # into pieces from the WAV by the gateway, whatever format it then encodes them in.
            fmt = "wav" if cmd.stream_to else cmd.response_format
            stored, audio = await bus.call("storage", GetRendition(account_id=cmd.account_id, key=entry["audio_key"],
                                                                   format=fmt),
                                           expect=StoredObject)
        except RemoteError as exc:
            if exc.code not in _GONE:
                raise
            log.warning("cache_entry_without_object", cache_key=key, audio_key=entry["audio_key"])
            await cache.drop(cmd.account_id, key)
        else:
            log.info("cache_hit", cache_key=key, fetch_ms=round((time.perf_counter() - started) * 1000, 2))
            metrics.CACHE_LOOKUPS.labels(cmd.backend, "hit").inc()
            return SynthesisAccepted(cache_hit=True, job_id=str(entry["job_id"]), status=domain.READY,
                                     cache_key=key, synthesis_ms=entry["synthesis_ms"] or 0,
                                     expires_at=stored.expires_at, content_type=stored.content_type), audio or b""
    metrics.CACHE_LOOKUPS.labels(cmd.backend, "miss").inc()
    # A streamed request makes its own job (the pieces of a job in flight go to another client's connection), and
    # so does one asking for word timestamps (the job in flight may not make them).
    own_job = bool(cmd.stream_to or cmd.timestamps)
    in_flight = None if own_job else await jobs.pending_for(cmd.account_id, key, cmd.response_format)
    if in_flight is not None:
        return SynthesisAccepted(cache_hit=False, job_id=str(in_flight["job_id"]), cache_key=key)
    profile = (cmd.voice.profile or {}).get(cmd.backend)
    request = {"ref_text": cmd.voice.ref_text, "system_voice": cmd.voice.system_voice, "voice_profile": profile,
               "reference_key": cmd.voice.reference_key if cmd.voice.kind == "custom" else None}
    if cmd.stream_to:
        request |= {"stream_to": cmd.stream_to, "stream_id": cmd.stream_id}
    if cmd.timestamps:
        request["timestamps"] = True
    job_id = str(uuid.uuid4())
    row = await jobs.create(job_id=job_id, account_id=cmd.account_id, voice_id=cmd.voice.voice_id, text=cmd.text,
                            lang=cmd.lang, backend=cmd.backend, cache_key=key,
                            response_format=cmd.response_format, request=request,
                            deadline_s=policy.deadline_for(cmd.backend, len(cmd.text)), hold_id=cmd.hold_id,
                            max_pending=policy.max_pending_per_account)
    if row is None:
        raise RpcError("too_many_pending_jobs",
                       f"this account already has {policy.max_pending_per_account} jobs pending; wait for some to "
                       "finish", status=429, details={"retry_after_s": 5})
    # The new job owns the quota hold now: job.ready or job.failed gives it back to billing.
    attached = cmd.hold_id is not None
    # Publish after the row exists: a crash in between leaves a pending job the deadline sweep re-sends.
    try:
        dispatched = await _dispatch(row, jobs=jobs, bus=bus, policy=policy)
    except WorkQueueFull:
        # Refused, not queued: the job ends now (its hold released with job.failed) and the client is told.
        await _fail(job_id, cmd.account_id, "work_queue_full", "the backend's work queue was full", jobs=jobs,
                    bus=bus)
        raise
    if not dispatched:
        return SynthesisAccepted(cache_hit=False, job_id=job_id, status=domain.FAILED, cache_key=key,
                                 hold_attached=attached)
    log.info("job_created", job_id=job_id, backend=cmd.backend, characters=len(cmd.text))
    return SynthesisAccepted(cache_hit=False, job_id=job_id, cache_key=key, hold_attached=attached)


async def _view(row: Any, *, bus: MessageBus, with_url: bool = True) -> JobView:
    audio_url = None
    if with_url and row["status"] == domain.READY and row["audio_key"]:
        url, _ = await bus.call("storage", Presign(key=row["audio_key"], account_id=row["account_id"], expires_in=3600),
                                expect=PresignedUrl)
        audio_url = url.url
    return JobView(job_id=str(row["job_id"]), voice_id=row["voice_id"], status=row["status"],
                   backend=row["backend"], lang=row["lang"], characters=row["characters"],
                   response_format=row["response_format"], created_at=row["created_at"],
                   completed_at=row["completed_at"], audio_url=audio_url, expires_at=row["audio_expires_at"],
                   error=row["error"], error_code=row["error_code"], synthesis_ms=row["synthesis_ms"],
                   audio_seconds=row["audio_seconds"], words=row.get("words"),
                   synthesized_at=row.get("synthesized_at"), stored_at=row.get("stored_at"))


async def _self_heal(row: Any, *, expired: bool, jobs: JobRepository, cache: CacheIndex, bus: MessageBus) -> None:
    """A ready job whose object is gone (expired, or vanished): mark it failed with why, forget its cache entry."""
    job_id = str(row["job_id"])
    code, reason = _EXPIRED if expired else _MISSING
    async with bus.transaction():
        healed = await jobs.mark_failed(job_id, code=code, reason=reason, from_status=(domain.READY,))
        await cache.drop_audio([row["audio_key"]])
        if healed is not None:  # only the request that made the transition announces it
            await bus.publish(JobFailed(job_id=job_id, account_id=row["account_id"], code=code, reason=reason),
                              message_id=f"job.failed:{job_id}")
    if expired:
        log.info("job_audio_expired", job_id=job_id, audio_key=row["audio_key"])
    else:
        log.error("job_audio_missing", job_id=job_id, audio_key=row["audio_key"])


def _expired(job_id: str) -> RpcError:
    return RpcError("audio_expired", f"job {job_id}'s audio expired and was deleted", status=410)


async def get_job(cmd: GetJob, *, envelope: Envelope, jobs: JobRepository, bus: MessageBus,
                  cache: CacheIndex | None = None) -> JobView:
    """A job's view; polling a ready job whose object has vanished self-heals it to failed."""
    if not is_canonical_uuid(cmd.job_id):
        raise _job_not_found(cmd.job_id)
    row = await jobs.get(cmd.job_id, cmd.account_id)
    if row is None:
        raise _job_not_found(cmd.job_id)
    try:
        return await _view(row, bus=bus)
    except RemoteError as exc:
        # Only a ready job presigns, so a gone object means its audio is gone.
        if exc.code not in _GONE or cache is None:
            raise
        expired = exc.code == "object_expired"
    await _self_heal(row, expired=expired, jobs=jobs, cache=cache, bus=bus)
    return await _view(await jobs.get(cmd.job_id, cmd.account_id), bus=bus)


async def fetch_audio(cmd: FetchJobAudio, *, envelope: Envelope, jobs: JobRepository, cache: CacheIndex,
                      bus: MessageBus) -> tuple[JobView, bytes]:
    """The WAV of a ready job; a ready job whose object has vanished self-heals to failed."""
    if not is_canonical_uuid(cmd.job_id):
        raise _job_not_found(cmd.job_id)
    row = await jobs.get(cmd.job_id, cmd.account_id)
    if row is None:
        raise _job_not_found(cmd.job_id)
    if row["status"] == domain.FAILED and row["error_code"] == _EXPIRED[0]:
        raise _expired(cmd.job_id)
    if row["status"] != domain.READY:
        raise NotFound("job_not_ready", f"job {cmd.job_id} is {row['status']}, not ready")
    fmt = cmd.response_format or row["response_format"]
    try:
        stored, audio = await bus.call("storage", GetRendition(account_id=row["account_id"], key=row["audio_key"],
                                                               format=fmt), expect=StoredObject)
    except RemoteError as exc:
        if exc.code not in _GONE:
            raise
        expired = exc.code == "object_expired"
        await _self_heal(row, expired=expired, jobs=jobs, cache=cache, bus=bus)
        if expired:
            raise _expired(cmd.job_id) from exc
        raise RpcError("audio_missing", f"job {cmd.job_id} was ready but its audio is missing; marked failed",
                       status=500) from exc
    view = await _view(row, bus=bus, with_url=False)
    return view.model_copy(update={"response_format": fmt, "content_type": stored.content_type}), audio or b""


async def lookup_job(cmd: LookupJob, *, envelope: Envelope, jobs: JobRepository) -> JobOwner:
    if not is_canonical_uuid(cmd.job_id):
        raise _job_not_found(cmd.job_id)
    row = await jobs.get(cmd.job_id)
    if row is None:
        raise _job_not_found(cmd.job_id)
    return JobOwner(job_id=cmd.job_id, account_id=row["account_id"], voice_id=row["voice_id"],
                    backend=row["backend"], status=row["status"], created_at=row["created_at"],
                    attempt=row["attempts"], attempts=row["attempts"])


async def _purge_voice(account_id: str, voice_id: str, *, jobs: JobRepository, cache: CacheIndex,
                       bus: MessageBus) -> int:
    async with bus.transaction():
        removed = await jobs.delete_voice(account_id, voice_id)
        cached = await cache.delete_voice(account_id, voice_id)
        keys = sorted({r["audio_key"] for r in removed if r["audio_key"]} | set(cached))
        if keys:
            await bus.publish(ObjectsReleased(account_id=account_id, keys=keys))
    return len(removed)


async def purge_voice(cmd: PurgeVoiceJobs, *, envelope: Envelope, jobs: JobRepository, cache: CacheIndex,
                      bus: MessageBus) -> None:
    """Delete a voice's jobs and cache entries now and release their audio."""
    await _purge_voice(cmd.account_id, cmd.voice_id, jobs=jobs, cache=cache, bus=bus)


async def on_voice_deleted(event: VoiceDeleted, *, envelope: Envelope, jobs: JobRepository, cache: CacheIndex,
                           bus: MessageBus) -> None:
    await _purge_voice(event.account_id, event.voice_id, jobs=jobs, cache=cache, bus=bus)


async def on_audio_stored(event: AudioStored, *, envelope: Envelope, jobs: JobRepository, cache: CacheIndex,
                          bus: MessageBus) -> None:
    """Replay guard: the first terminal transition wins; late or repeated results change nothing."""
    async with bus.transaction():  # the transition, the cache entry and job.ready commit together
        transitioned = await _apply_audio_stored(event, jobs=jobs, cache=cache, bus=bus)
    if transitioned is not None:
        log.info("job_ready" if transitioned else "job_ready_reannounced", job_id=event.job_id,
                 synthesis_ms=event.synthesis_ms, audio_seconds=event.audio_seconds)


async def _apply_audio_stored(event: AudioStored, *, jobs: JobRepository, cache: CacheIndex,
                              bus: MessageBus) -> bool | None:
    """True: the job became ready now; False: re-announced; None: nothing to announce."""
    row = await jobs.mark_ready(event.job_id, audio_key=event.key, expires_at=event.expires_at,
                                synthesis_ms=event.synthesis_ms, audio_seconds=event.audio_seconds,
                                **({"synthesized_at": event.synthesized_at, "stored_at": event.stored_at}
                                   if event.stored_at is not None else {}))
    transitioned = row is not None
    if row is not None:
        _job_finished(row, "ready")
        if event.words is not None:
            await jobs.set_words(event.job_id, event.words)
    if row is None:
        existing = await jobs.get(event.job_id)
        if existing is None:
            # The job was deleted (voice or account gone) while it ran: its audio has no owner.
            await bus.publish(ObjectsReleased(account_id=event.account_id, keys=[event.key]))
            return None
        if existing["status"] == domain.FAILED:
            # The job ended failed first (deadline, say): nothing will ever point at this late audio.
            await bus.publish(ObjectsReleased(account_id=event.account_id, keys=[event.key]))
            log.info("late_result_released", job_id=event.job_id)
            return None
        if existing["audio_key"] != event.key:
            log.info("late_result_ignored", job_id=event.job_id, status=existing["status"])
            return None
        # Ready with this very object: a redelivery, maybe after a crash between the transition and job.ready.
        # Redo the idempotent tail (an upsert; job.ready keeps its message id) so job.ready is never lost.
        row = existing
    await cache.put(account_id=row["account_id"], cache_key=row["cache_key"], voice_id=row["voice_id"],
                    job_id=event.job_id, audio_key=event.key, expires_at=event.expires_at,
                    synthesis_ms=event.synthesis_ms)
    await bus.publish(JobReady(job_id=event.job_id, account_id=row["account_id"], voice_id=row["voice_id"],
                               backend=row["backend"], characters=row["characters"], audio_key=event.key,
                               expires_at=event.expires_at, hold_id=row.get("hold_id"),
                               cache_key=row.get("cache_key"), lang=row.get("lang"),
                               response_format=row.get("response_format"), created_at=row.get("created_at"),
                               completed_at=row.get("completed_at"), synthesis_ms=event.synthesis_ms,
                               audio_seconds=event.audio_seconds,
                               has_words=event.words is not None or row.get("words") is not None,
                               synthesized_at=row.get("synthesized_at"), stored_at=row.get("stored_at")),
                      message_id=f"job.ready:{event.job_id}")
    return transitioned


async def _fail(job_id: str, account_id: str, code: str, reason: str, *, jobs: JobRepository,
                bus: MessageBus) -> None:
    reason = scrub_urls(reason)  # a presigned URL's signature never reaches a job's error text
    async with bus.transaction():  # failed and job.failed commit together
        failed = await jobs.mark_failed(job_id, code=code, reason=reason)
        if failed is not None:
            await bus.publish(JobFailed(job_id=job_id, account_id=account_id, code=code, reason=reason,
                                        hold_id=failed.get("hold_id")), message_id=f"job.failed:{job_id}")
    if failed is not None:
        _job_finished(failed, "failed")
        log.warning("job_failed", job_id=job_id, code=code, reason=reason)


async def _redispatch(row: Any, *, jobs: JobRepository, bus: MessageBus, policy: JobPolicy, code: str,
                      reason: str) -> None:
    """Hand the job out again, or fail it once its attempts are spent."""
    if row["attempts"] >= policy.max_attempts:
        await _fail(str(row["job_id"]), row["account_id"], code,
                    f"{reason} (after {row['attempts']} attempts)", jobs=jobs, bus=bus)
        return
    retried = await jobs.retry(str(row["job_id"]), deadline_s=policy.deadline_for(row["backend"], row["characters"]))
    try:
        if retried is None or not await _dispatch(retried, jobs=jobs, bus=bus, policy=policy):
            return
    except WorkQueueFull:
        # The attempt is counted: the next deadline tries again, and the last attempt fails the job.
        log.warning("job_redispatch_refused", job_id=str(row["job_id"]), attempt=retried["attempts"],
                    reason="work queue full")
        return
    log.warning("job_redispatched", job_id=str(row["job_id"]), attempt=retried["attempts"], reason=reason)


async def on_synthesis_failed(event: SynthesisFailed, *, envelope: Envelope, jobs: JobRepository,
                              bus: MessageBus, policy: JobPolicy) -> None:
    row = await jobs.get(event.job_id)
    if row is None or row["status"] != domain.PENDING:
        return
    if event.attempt is not None and event.attempt < row["attempts"]:
        # An older attempt failing says nothing about the newer one still running.
        log.info("stale_failure_ignored", job_id=event.job_id, attempt=event.attempt, current=row["attempts"])
        return
    if event.retryable:
        await _redispatch(row, jobs=jobs, bus=bus, policy=policy, code=event.code, reason=event.reason)
    else:
        await _fail(event.job_id, row["account_id"], event.code, event.reason, jobs=jobs, bus=bus)


async def sweep_overdue(*, jobs: JobRepository, bus: MessageBus, policy: JobPolicy) -> int:
    """Re-send or fail every pending job past its deadline: no job stays pending forever."""
    rows = await jobs.overdue()
    for row in rows:
        allowed = policy.deadline_for(row["backend"], row["characters"])
        await _redispatch(row, jobs=jobs, bus=bus, policy=policy, code="deadline_exceeded",
                          reason=f"no result within {allowed:.0f}s")
    return len(rows)


async def sweep_finished(*, jobs: JobRepository, cache: CacheIndex, bus: MessageBus, retention_s: float) -> int:
    """Delete jobs that ended more than `retention_s` ago, with their text, cache entries and any audio left."""
    total = 0
    while rows := await jobs.delete_finished(older_than_s=retention_s):
        await cache.drop_jobs([str(r["job_id"]) for r in rows])
        by_account: dict[str, list[str]] = {}
        for r in rows:
            if r["audio_key"]:
                by_account.setdefault(r["account_id"], []).append(r["audio_key"])
        for account_id, keys in by_account.items():
            await bus.publish(ObjectsReleased(account_id=account_id, keys=keys))
        total += len(rows)
    return total


async def on_objects_expired(event: ObjectsExpired, *, envelope: Envelope, jobs: JobRepository,
                             cache: CacheIndex, bus: MessageBus) -> None:
    """Expired audio: drop the cache entries, mark the jobs that pointed there, and say so."""
    async with bus.transaction():
        dropped = await cache.drop_audio(event.keys)
        failed = await jobs.fail_with_audio(event.keys, code=_EXPIRED[0], reason=_EXPIRED[1])
        for row in failed:
            await bus.publish(JobFailed(job_id=str(row["job_id"]), account_id=row["account_id"], code=_EXPIRED[0],
                                        reason=_EXPIRED[1]), message_id=f"job.failed:{row['job_id']}")
    log.info("expired_audio_forgotten", cache_entries=dropped, jobs=len(failed))


async def on_account_purge(event: AccountPurgeRequested, *, envelope: Envelope, jobs: JobRepository,
                           cache: CacheIndex, bus: MessageBus) -> None:
    async with bus.transaction():
        removed = await jobs.delete_account(event.account_id)
        await cache.delete_account(event.account_id)
        await bus.publish(AccountPurged(account_id=event.account_id, purge_id=event.purge_id, service="dispatcher",
                                        removed=len(removed)))
