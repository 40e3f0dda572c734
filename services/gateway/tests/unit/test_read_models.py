"""The gateway's read models: what they answer, and every invalidation taking effect at once."""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from timbre_common.catalogue import SYSTEM_VOICES
from timbre_common.contracts.accounts import AccountPurged, AccountPurgeRequested, ApiKeysChanged
from timbre_common.contracts.billing import AccountKeysRestored, AccountKeysRevoked
from timbre_common.contracts.storage import ObjectsExpired
from timbre_common.contracts.synthesis import JobFailed, JobReady, cache_key
from timbre_common.contracts.voices import VoiceDeleted, VoiceRegistered
from timbre_dispatcher.domain import cache_key as dispatcher_cache_key
from timbre_gateway.adapters.bucket import FsBucketReader, rendition_key
from timbre_gateway.adapters.read_models import KnownKey, ReadModels

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ACCOUNT, OTHER = "acct-1", "acct-2"
VOICE = "11111111-1111-4111-8111-111111111111"


def _ready(job_id: str = "job-1", *, voice_id: str = VOICE, account: str = ACCOUNT, key: str = "k",
           expires_at: datetime | None = NOW + timedelta(days=7), **extra: object) -> JobReady:
    return JobReady(job_id=job_id, account_id=account, voice_id=voice_id, backend="embedded", characters=5,
                    audio_key=f"generations/{account}/{job_id}.wav", expires_at=expires_at, cache_key=key,
                    lang="en", response_format="wav", created_at=NOW - timedelta(seconds=1), completed_at=NOW,
                    synthesis_ms=40, audio_seconds=1.5, **extra)


def _models() -> ReadModels:
    models = ReadModels()
    asyncio.run(models.on_event(VoiceRegistered(voice_id=VOICE, account_id=ACCOUNT, backend="embedded", lang="en",
                                                reference_key="r", reference_url="http://x/r")))
    asyncio.run(models.on_event(_ready()))
    return models


def test_the_cache_key_is_the_dispatchers() -> None:
    assert cache_key(VOICE, "Hello there.", "en", "embedded") == dispatcher_cache_key(VOICE, "Hello there.", "en",
                                                                                      "embedded")


def test_answers_only_the_owner_and_only_before_expiry() -> None:
    models = _models()
    assert models.voice(ACCOUNT, VOICE) is not None and models.voice(OTHER, VOICE) is None
    assert models.cached(ACCOUNT, "k", NOW).job_id == "job-1"
    assert models.cached(OTHER, "k", NOW) is None
    assert models.ready_job(ACCOUNT, "job-1", NOW) is not None and models.ready_job(OTHER, "job-1", NOW) is None
    # An expired object is never answered, whether or not its objects.expired has come.
    late = NOW + timedelta(days=7, seconds=1)
    assert models.cached(ACCOUNT, "k", late) is None and models.ready_job(ACCOUNT, "job-1", late) is None
    system = SYSTEM_VOICES[0]
    assert models.voice(OTHER, system.voice_id) is not None


def test_a_deleted_voice_goes_at_once_and_cannot_come_back() -> None:
    models = _models()
    asyncio.run(models.on_event(VoiceDeleted(voice_id=VOICE, account_id=ACCOUNT)))
    assert models.voice(ACCOUNT, VOICE) is None
    assert models.cached(ACCOUNT, "k", NOW) is None and models.ready_job(ACCOUNT, "job-1", NOW) is None
    # A late registration or job.ready of the deleted voice is not learnt again.
    asyncio.run(models.on_event(VoiceRegistered(voice_id=VOICE, account_id=ACCOUNT, backend="embedded", lang="en",
                                                reference_key="r", reference_url="http://x/r")))
    asyncio.run(models.on_event(_ready("job-2")))
    assert models.voice(ACCOUNT, VOICE) is None and models.cached(ACCOUNT, "k", NOW) is None


def test_expired_objects_failed_jobs_and_purged_accounts_are_forgotten() -> None:
    models = _models()
    asyncio.run(models.on_event(ObjectsExpired(keys=[f"generations/{ACCOUNT}/job-1.wav"])))
    assert models.cached(ACCOUNT, "k", NOW) is None and models.ready_job(ACCOUNT, "job-1", NOW) is None

    models = _models()
    asyncio.run(models.on_event(JobFailed(job_id="job-1", account_id=ACCOUNT, code="audio_expired", reason="x")))
    assert models.ready_job(ACCOUNT, "job-1", NOW) is None and models.cached(ACCOUNT, "k", NOW) is None

    models = _models()
    asyncio.run(models.on_event(_ready("job-9", account=OTHER, voice_id=SYSTEM_VOICES[0].voice_id)))
    asyncio.run(models.on_event(AccountPurgeRequested(account_id=ACCOUNT, purge_id="p")))
    assert models.voice(ACCOUNT, VOICE) is None and models.cached(ACCOUNT, "k", NOW) is None
    assert models.ready_job(OTHER, "job-9", NOW) is not None  # another account keeps its own


def test_what_it_cannot_answer_is_left_to_the_services() -> None:
    models = ReadModels(max_entries=2)
    # An older dispatcher's job.ready (no cache key, language...) and one with word timestamps teach nothing.
    asyncio.run(models.on_event(JobReady(job_id="j", account_id=ACCOUNT, voice_id=VOICE, backend="embedded",
                                         characters=1, audio_key="a.wav")))
    asyncio.run(models.on_event(_ready("job-w", key="w", has_words=True)))
    assert models.ready_job(ACCOUNT, "j", NOW) is None and models.cached(ACCOUNT, "w", NOW) is None
    # Bounded: the oldest entry goes first.
    for i in range(3):
        asyncio.run(models.on_event(_ready(f"job-{i}", key=f"k{i}")))
    assert models.ready_job(ACCOUNT, "job-0", NOW) is None and models.ready_job(ACCOUNT, "job-2", NOW) is not None
    # A job with word timestamps takes over its cache key at the dispatcher: the older entry goes here.
    asyncio.run(models.on_event(_ready("job-2w", key="k2", has_words=True)))
    assert models.cached(ACCOUNT, "k2", NOW) is None
    models.forget_cache_key(ACCOUNT, "k1")
    assert models.cached(ACCOUNT, "k1", NOW) is None and models.ready_job(ACCOUNT, "job-1", NOW) is None
    models.clear()
    assert models.ready_job(ACCOUNT, "job-2", NOW) is None and models.voice(OTHER, SYSTEM_VOICES[0].voice_id)


def test_the_fs_reader_reads_storage_files_and_nothing_outside(tmp_path: Path) -> None:
    key = "generations/acct/2026/01/01/000000-job.wav"
    (tmp_path / key).parent.mkdir(parents=True)
    (tmp_path / key).write_bytes(b"RIFFdata")
    (tmp_path / rendition_key(key, "mp3")).write_bytes(b"ID3")
    (tmp_path / key).with_name(".000000-job.mp3.ct").write_text("audio/mpeg")
    (tmp_path / key).with_name(".000000-job.wav.ct").write_text("audio/wav")
    reader = FsBucketReader(tmp_path, public_base_url="http://s", signing_key=b"k" * 32)
    assert asyncio.run(reader.read(key)) == (b"RIFFdata", "audio/wav")
    assert asyncio.run(reader.read(rendition_key(key, "mp3"))) == (b"ID3", "audio/mpeg")
    assert asyncio.run(reader.read(rendition_key(key, "flac"))) is None
    assert asyncio.run(reader.read("../outside.wav")) is None
    assert asyncio.run(reader.read("generations/acct/2026/01/01/.000000-job.mp3.ct")) is None
    url = asyncio.run(reader.presign(key, 60))
    assert url is not None and url.startswith(f"http://s/blobs/{key}?expires=")
    assert asyncio.run(reader.presign("generations/missing.wav", 60)) is None
    assert rendition_key("voices/x.mp3", "mp3") is None


def _key(account: str = ACCOUNT, key_id: str = "key-1", status: str = "active", at: float = 100.0) -> KnownKey:
    return KnownKey(account_id=account, key_id=key_id, rate_per_minute=60, max_concurrent=2, account_status=status,
                    read_at=at)


def test_keys_are_kept_until_their_account_changes() -> None:
    models = ReadModels(key_ttl_s=60)
    models.remember_key("h1", _key(), models.key_epoch)
    models.remember_key("h2", _key(key_id="key-2"), models.key_epoch)
    models.remember_key("h3", _key(OTHER, "key-3"), models.key_epoch)
    assert models.api_key("h1", now=101) == _key()
    # Another instance changed the account's keys: every key of that account is read again, the others stay.
    asyncio.run(models.on_event(ApiKeysChanged(account_id=ACCOUNT)))
    assert models.api_key("h1", now=101) is None and models.api_key("h2", now=101) is None
    assert models.api_key("h3", now=101) is not None
    # Billing's suspension and restoration, and the gateway's own share of a purge, drop them too.
    for event in (AccountKeysRevoked(account_id=OTHER, reason="payment_failed"), AccountKeysRestored(account_id=OTHER),
                  AccountPurged(account_id=OTHER, purge_id="p", service="gateway"),
                  AccountPurgeRequested(account_id=OTHER, purge_id="p")):
        models.remember_key("h3", _key(OTHER, "key-3"), models.key_epoch)
        asyncio.run(models.on_event(event))
        assert models.api_key("h3", now=101) is None, event
    # Another service's purge confirmation says nothing about keys.
    models.remember_key("h3", _key(OTHER, "key-3"), models.key_epoch)
    asyncio.run(models.on_event(AccountPurged(account_id=OTHER, purge_id="p", service="voices")))
    assert models.api_key("h3", now=101) is not None


def test_a_key_read_before_an_invalidation_is_not_kept() -> None:
    models = ReadModels()
    epoch = models.key_epoch  # a request starts reading the database ...
    models.forget_account_keys(ACCOUNT)  # ... a revocation lands meanwhile ...
    models.remember_key("h1", _key(), epoch)  # ... and what it read may predate it
    assert models.api_key("h1", now=101) is None
    models.remember_key("h1", _key(), models.key_epoch)
    assert models.api_key("h1", now=101) is not None


def test_keys_expire_and_are_not_kept_while_the_subscription_is_down() -> None:
    models = ReadModels(key_ttl_s=30)
    models.remember_key("h1", _key(at=100.0), models.key_epoch)
    assert models.api_key("h1", now=129) is not None
    assert models.api_key("h1", now=131) is None
    models.remember_key("h1", _key(), models.key_epoch)
    models.clear()  # the connection was lost: events may have been missed
    assert models.api_key("h1", now=101) is None
    models.keys_enabled = False
    models.remember_key("h1", _key(), models.key_epoch)
    assert models.api_key("h1", now=101) is None


def test_keys_held_are_bounded() -> None:
    models = ReadModels(max_entries=2)
    for i in range(3):
        models.remember_key(f"h{i}", _key(key_id=f"key-{i}"), models.key_epoch)
    assert models.api_key("h0", now=101) is None and models.api_key("h2", now=101) is not None


def test_an_account_named_in_capitals_is_still_forgotten() -> None:
    account = "38c50548-0d3a-4a4e-9a53-1c0c6f1b2a7e"
    models = ReadModels()
    models.remember_key("h1", _key(account), models.key_epoch)
    models.forget_account(account.upper())
    assert models.api_key("h1", now=101) is None
    models.remember_key("h1", _key(account), models.key_epoch)
    asyncio.run(models.on_event(AccountPurged(account_id=account.upper(), purge_id="p", service="gateway")))
    assert models.api_key("h1", now=101) is None
