"""What the gateway knows without asking: read models fed by events, with explicit invalidation.

- voices: who owns a voice, its backend and language (voice.registered / voice.deleted; system voices from the
  catalogue); a deleted voice leaves a tombstone so a late or repeated registration cannot bring it back;
- the cache index: (account, cache key) -> the ready job and its stored audio (job.ready), dropped on
  objects.expired, voice.deleted and an account purge, and never answered past its expiry;
- ready jobs: what a poll and a download answer (job.ready), dropped with the audio or on job.failed;
- API keys: a key's account, limits and the account's standing, read from the gateway's database on first use
  and dropped for the whole account on account.keys_changed (published with every change, through the outbox),
  billing's keys revoked / restored and an account purge; at the latest after `key_ttl_s`.

Nothing here is authoritative: a question these models cannot answer goes to the owning service as before, so
an empty model (a fresh instance, a lost subscription) costs speed, never correctness. Sizes are bounded: the
oldest entries are forgotten first.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from timbre_common.catalogue import EMBEDDED_BACKEND, SYSTEM_VOICES
from timbre_common.contracts.accounts import AccountPurged, AccountPurgeRequested, ApiKeysChanged
from timbre_common.contracts.base import Event
from timbre_common.contracts.billing import AccountKeysRestored, AccountKeysRevoked
from timbre_common.contracts.storage import ObjectsExpired
from timbre_common.contracts.synthesis import JobFailed, JobReady
from timbre_common.contracts.voices import VoiceDeleted, VoiceRegistered


@dataclass(frozen=True, slots=True)
class KnownVoice:
    voice_id: str
    account_id: str | None  # None: a system voice, everyone's
    backend: str
    lang: str


@dataclass(frozen=True, slots=True)
class ReadyJob:
    job_id: str
    account_id: str
    voice_id: str
    backend: str
    lang: str
    characters: int
    response_format: str
    audio_key: str
    created_at: datetime
    completed_at: datetime | None
    expires_at: datetime | None
    synthesis_ms: int | None
    audio_seconds: float | None
    cache_key: str | None
    synthesized_at: datetime | None = None
    stored_at: datetime | None = None

    def live(self, now: datetime) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True, slots=True)
class KnownKey:
    account_id: str
    key_id: str
    rate_per_minute: int | None
    max_concurrent: int | None
    account_status: str
    read_at: float  # time.monotonic() when it was read from the database


def _now() -> datetime:
    return datetime.now(UTC)


class ReadModels:
    """In-process read models of one gateway instance (see the module's docstring)."""

    def __init__(self, *, max_entries: int = 100_000, key_ttl_s: float = 60.0) -> None:
        self.max_entries = max_entries
        self.key_ttl_s = key_ttl_s
        self._keys: OrderedDict[str, KnownKey] = OrderedDict()  # key hash -> what it may do
        self._account_keys: dict[str, set[str]] = {}  # account -> hashes of its keys held here
        # Bumped by every invalidation: a database read that began before one is not kept (it may predate it).
        self.key_epoch = 0
        # Off while the event subscription is down: nothing would tell this instance about a revocation.
        self.keys_enabled = True
        self._voices: dict[str, KnownVoice] = {v.voice_id: KnownVoice(v.voice_id, None, EMBEDDED_BACKEND, v.lang)
                                               for v in SYSTEM_VOICES}
        self._deleted_voices: set[str] = set()
        self._jobs: OrderedDict[str, ReadyJob] = OrderedDict()
        self._cache: dict[tuple[str, str], str] = {}  # (account, cache key) -> job id
        self._by_audio_key: dict[str, str] = {}  # audio key -> job id

    # Questions -------------------------------------------------------------------------------------------
    def voice(self, account_id: str, voice_id: str) -> KnownVoice | None:
        """The voice when it is known to be the account's (or a system voice); None: ask the voices service."""
        voice = self._voices.get(voice_id)
        if voice is None or (voice.account_id is not None and voice.account_id != account_id):
            return None
        return voice

    def api_key(self, key_hash: str, now: float | None = None) -> KnownKey | None:
        """What the key may do, as last read; None: read the database (and `remember_key`)."""
        known = self._keys.get(key_hash)
        if known is None:
            return None
        if (now if now is not None else time.monotonic()) - known.read_at > self.key_ttl_s:
            self._forget_key(key_hash)
            return None
        return known

    def remember_key(self, key_hash: str, known: KnownKey, epoch: int) -> None:
        """Keep a key read from the database, unless an invalidation came while it was being read."""
        if not self.keys_enabled or epoch != self.key_epoch:
            return
        self._keys[key_hash] = known
        self._account_keys.setdefault(known.account_id, set()).add(key_hash)
        while len(self._keys) > self.max_entries:
            self._forget_key(next(iter(self._keys)))

    def forget_account_keys(self, account_id: str) -> None:
        """At once, in the instance that made the change; by account.keys_changed in the others."""
        account_id = account_id.lower()  # as the database spells it, whoever sent the event
        self.key_epoch += 1
        for key_hash in self._account_keys.pop(account_id, set()):
            self._keys.pop(key_hash, None)

    def _forget_key(self, key_hash: str) -> None:
        known = self._keys.pop(key_hash, None)
        if known is not None:
            hashes = self._account_keys.get(known.account_id)
            if hashes is not None:
                hashes.discard(key_hash)
                if not hashes:
                    del self._account_keys[known.account_id]

    def cached(self, account_id: str, cache_key: str, now: datetime | None = None) -> ReadyJob | None:
        job_id = self._cache.get((account_id, cache_key))
        job = self._jobs.get(job_id) if job_id else None
        return job if job is not None and job.live(now or _now()) else None

    def ready_job(self, account_id: str, job_id: str, now: datetime | None = None) -> ReadyJob | None:
        job = self._jobs.get(job_id)
        if job is None or job.account_id != account_id or not job.live(now or _now()):
            return None
        return job

    # Events ----------------------------------------------------------------------------------------------
    async def on_event(self, event: Event, **_: object) -> None:
        """The one subscriber of this instance's fan-out queue."""
        if isinstance(event, JobReady):
            self.job_ready(event)
        elif isinstance(event, JobFailed):
            self._drop_job(event.job_id)
        elif isinstance(event, ObjectsExpired):
            self.objects_gone(event.keys)
        elif isinstance(event, VoiceRegistered):
            self.voice_registered(event.voice_id, event.account_id, event.backend, event.lang)
        elif isinstance(event, VoiceDeleted):
            self.voice_deleted(event.voice_id)
        elif isinstance(event, AccountPurgeRequested):
            self.forget_account(event.account_id)
        elif isinstance(event, (ApiKeysChanged, AccountKeysRevoked, AccountKeysRestored)):
            self.forget_account_keys(event.account_id)
        elif isinstance(event, AccountPurged) and event.service == "gateway":
            self.forget_account_keys(event.account_id)  # the keys are gone from the database now

    def job_ready(self, event: JobReady) -> None:
        if event.lang is None or event.response_format is None or event.created_at is None:
            return  # an older dispatcher's event: not enough to answer from
        if event.cache_key is not None and event.has_words:
            # The dispatcher's cache entry now names this job, whose word timestamps it answers: ask it.
            stale = self._cache.pop((event.account_id, event.cache_key), None)
            if stale is not None:
                self._drop_job(stale)
        if event.voice_id in self._deleted_voices or event.has_words:
            return
        self._drop_job(event.job_id)
        job = ReadyJob(job_id=event.job_id, account_id=event.account_id, voice_id=event.voice_id,
                       backend=event.backend, lang=event.lang, characters=event.characters,
                       response_format=event.response_format, audio_key=event.audio_key,
                       created_at=event.created_at, completed_at=event.completed_at, expires_at=event.expires_at,
                       synthesis_ms=event.synthesis_ms, audio_seconds=event.audio_seconds, cache_key=event.cache_key,
                       synthesized_at=event.synthesized_at, stored_at=event.stored_at)
        self._jobs[job.job_id] = job
        self._by_audio_key[job.audio_key] = job.job_id
        if job.cache_key is not None:
            self._cache[(job.account_id, job.cache_key)] = job.job_id
        while len(self._jobs) > self.max_entries:
            self._drop_job(next(iter(self._jobs)))

    def voice_registered(self, voice_id: str, account_id: str, backend: str, lang: str) -> None:
        if voice_id in self._deleted_voices:
            return
        self._voices[voice_id] = KnownVoice(voice_id, account_id, backend, lang)
        if len(self._voices) > self.max_entries + len(SYSTEM_VOICES):
            for vid, voice in list(self._voices.items()):
                if voice.account_id is not None:
                    del self._voices[vid]
                    break

    def voice_deleted(self, voice_id: str) -> None:
        """At once, in the instance that deleted it; by the event in the others."""
        voice = self._voices.get(voice_id)
        if voice is not None and voice.account_id is None:
            return  # system voices are never deleted
        self._voices.pop(voice_id, None)
        self._deleted_voices.add(voice_id)
        for job in [j for j in self._jobs.values() if j.voice_id == voice_id]:
            self._drop_job(job.job_id)

    def objects_gone(self, keys: list[str]) -> None:
        for key in keys:
            job_id = self._by_audio_key.get(key)
            if job_id is not None:
                self._drop_job(job_id)

    def forget_account(self, account_id: str) -> None:
        account_id = account_id.lower()
        self.forget_account_keys(account_id)
        for job in [j for j in self._jobs.values() if j.account_id == account_id]:
            self._drop_job(job.job_id)
        for voice in [v for v in self._voices.values() if v.account_id == account_id]:
            self._voices.pop(voice.voice_id, None)
            self._deleted_voices.add(voice.voice_id)

    def forget_cache_key(self, account_id: str, cache_key: str) -> None:
        """The dispatcher answered a miss for this key: the entry known here is no longer its cache entry."""
        job_id = self._cache.pop((account_id, cache_key), None)
        if job_id is not None:
            self._drop_job(job_id)

    def clear(self) -> None:
        """Forget everything learned from events (the subscription was lost: events may have been missed)."""
        self._voices = {vid: v for vid, v in self._voices.items() if v.account_id is None}
        self.key_epoch += 1
        self._keys.clear()
        self._account_keys.clear()
        self._jobs.clear()
        self._cache.clear()
        self._by_audio_key.clear()

    def _drop_job(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        if self._by_audio_key.get(job.audio_key) == job_id:
            del self._by_audio_key[job.audio_key]
        if job.cache_key is not None and self._cache.get((job.account_id, job.cache_key)) == job_id:
            del self._cache[(job.account_id, job.cache_key)]


READ_MODEL_EVENTS: list[type[Event]] = [JobReady, JobFailed, ObjectsExpired, VoiceRegistered, VoiceDeleted,
                                        AccountPurgeRequested, AccountPurged, ApiKeysChanged, AccountKeysRevoked,
                                        AccountKeysRestored]
