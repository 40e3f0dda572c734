"""The storage service layer over PostgreSQL and both bucket backends."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from timbre_storage import handlers
from timbre_storage.adapters.blob import BlobStore
from timbre_storage.adapters.repository import ObjectRepository
from timbre_storage.domain import (
    InvalidId,
    InvalidPurpose,
    ObjectKind,
    ObjectMissing,
    RetentionClass,
    UploadPurpose,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
JOB_CREATED = datetime(2026, 5, 1, 11, 59, 58, tzinfo=UTC)
JOB = "6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5"


async def test_store_generated_audio_is_idempotent(repo: ObjectRepository, store: BlobStore) -> None:
    first = await handlers.store_generated_audio(
        job_id=JOB, account_id="acc1", created_at=JOB_CREATED, wav=b"RIFF-1", repo=repo, store=store, now=NOW
    )
    assert first.key == f"generations/acc1/2026/05/01/115958-{JOB}.wav"
    assert (first.size, first.expires_at) == (6, NOW + timedelta(days=7))
    assert (first.kind, first.retention, first.owner_ref) == (ObjectKind.GENERATION, RetentionClass.TTS_AUDIO, JOB)
    again = await handlers.store_generated_audio(
        job_id=JOB, account_id="acc1", created_at=JOB_CREATED, wav=b"RIFF-1", repo=repo, store=store,
        now=NOW + timedelta(minutes=5),
    )
    assert again == first
    assert await handlers.get_object(key=first.key, account_id="acc1", repo=repo, store=store, now=NOW) == b"RIFF-1"


async def test_redelivery_after_lost_blob_rewrites_with_same_answer(repo: ObjectRepository, store: BlobStore) -> None:
    first = await handlers.store_generated_audio(
        job_id=JOB, account_id="acc1", created_at=JOB_CREATED, wav=b"RIFF-1", repo=repo, store=store, now=NOW
    )
    await store.delete(first.key)
    again = await handlers.store_generated_audio(
        job_id=JOB, account_id="acc1", created_at=JOB_CREATED, wav=b"RIFF-1", repo=repo, store=store,
        now=NOW + timedelta(hours=1),
    )
    assert again == first
    assert await store.get(first.key) == b"RIFF-1"


async def test_voice_references(repo: ObjectRepository, store: BlobStore) -> None:
    system = await handlers.store_voice_reference(account_id=None, voice_id="joe", wav=b"S", repo=repo, store=store)
    custom = await handlers.store_voice_reference(account_id="acc1", voice_id="v1", wav=b"C", repo=repo, store=store)
    assert (system.key, system.expires_at, system.kind) == ("voices/system/joe.wav", None, ObjectKind.SYSTEM_VOICE)
    assert (custom.key, custom.expires_at, custom.account_id) == ("voices/custom/acc1/v1.wav", None, "acc1")
    with pytest.raises(InvalidId):
        await handlers.store_voice_reference(account_id="acc1", voice_id="../v", wav=b"C", repo=repo, store=store)


async def test_uploads_by_purpose(repo: ObjectRepository, store: BlobStore) -> None:
    clone = await handlers.store_upload(
        account_id="acc1", upload_id="u1", purpose="voice_clone", data=b"W", content_type="audio/wav",
        repo=repo, store=store, now=NOW,
    )
    # Kept a day unless a voice claims it.
    assert clone.key == "voice-recordings/acc1/2026/05/01/120000-u1.wav"
    assert clone.expires_at == NOW + timedelta(days=1)
    stt = await handlers.store_upload(
        account_id="acc1", upload_id="u2", purpose=UploadPurpose.STT_INPUT, data=b"M", content_type="audio/mpeg",
        repo=repo, store=store, now=NOW,
    )
    assert stt.key == "uploads/acc1/2026/05/01/120000-u2.mp3"
    assert stt.expires_at == NOW + timedelta(days=30) and stt.retention is RetentionClass.STT_INPUT
    again = await handlers.store_upload(
        account_id="acc1", upload_id="u2", purpose=UploadPurpose.STT_INPUT, data=b"M", content_type="audio/mpeg",
        repo=repo, store=store, now=NOW + timedelta(days=1),
    )
    assert again == stt
    with pytest.raises(InvalidId):
        await handlers.store_upload(
            account_id="acc2", upload_id="u2", purpose="upload", data=b"M", content_type="audio/mpeg",
            repo=repo, store=store,
        )
    with pytest.raises(InvalidPurpose):
        await handlers.store_upload(
            account_id="acc1", upload_id="u3", purpose="forever", data=b"M", content_type="audio/mpeg",
            repo=repo, store=store,
        )
    generic = await handlers.store_upload(
        account_id="acc1", upload_id="u4", purpose=None, data=b"F", content_type="application/octet-stream",
        filename="take.FLAC", repo=repo, store=store, now=NOW,
    )
    # The client's file name picks nothing: bytes of no known type are stored as .bin.
    assert generic.key == "uploads/acc1/2026/05/01/120000-u4.bin" and generic.retention is RetentionClass.UPLOAD
    upload, found = await handlers.get_upload(account_id="acc1", upload_id="u2", repo=repo, now=NOW)
    assert (upload.purpose, found) == (UploadPurpose.STT_INPUT, stt)
    with pytest.raises(ObjectMissing):
        await handlers.get_upload(account_id="acc2", upload_id="u2", repo=repo, now=NOW)


async def test_get_object_missing_cases(repo: ObjectRepository, store: BlobStore) -> None:
    with pytest.raises(ObjectMissing):
        await handlers.get_object(key="generations/acc1/none.wav", account_id="acc1", repo=repo, store=store)
    obj = await handlers.store_generated_audio(
        job_id=JOB, account_id="acc1", created_at=JOB_CREATED, wav=b"RIFF", repo=repo, store=store, now=NOW
    )
    await store.delete(obj.key)  # the index says yes, the bucket says no
    with pytest.raises(ObjectMissing):
        await handlers.get_object(key=obj.key, account_id="acc1", repo=repo, store=store, now=NOW)
    with pytest.raises(ObjectMissing):
        await handlers.presign(key=obj.key, account_id="acc1", repo=repo, store=store, now=NOW)


async def test_presign_never_outlives_the_object(repo: ObjectRepository, store: BlobStore) -> None:
    obj = await handlers.store_generated_audio(
        job_id=JOB, account_id="acc1", created_at=JOB_CREATED, wav=b"RIFF", repo=repo, store=store, now=NOW
    )
    url, until, object_until = await handlers.presign(key=obj.key, account_id="acc1", repo=repo, store=store, now=NOW)
    assert until == NOW + timedelta(hours=1) and obj.key.split("/")[-1] in url
    assert object_until == obj.expires_at
    late = NOW + timedelta(days=7) - timedelta(minutes=10)
    _, until, _ = await handlers.presign(key=obj.key, account_id="acc1", repo=repo, store=store, now=late)
    assert until == obj.expires_at


async def test_sweep_removes_expired_from_bucket_and_index(repo: ObjectRepository, store: BlobStore) -> None:
    old = await handlers.store_generated_audio(
        job_id="j-old", account_id="acc1", created_at=NOW, wav=b"O", repo=repo, store=store, now=NOW
    )
    fresh = await handlers.store_generated_audio(
        job_id="j-new", account_id="acc1", created_at=NOW, wav=b"N", repo=repo, store=store, now=NOW + timedelta(days=2)
    )
    voice = await handlers.store_voice_reference(account_id="acc1", voice_id="v1", wav=b"V", repo=repo, store=store)
    later = NOW + timedelta(days=7, seconds=1)
    with pytest.raises(ObjectMissing):  # past expires_at it is already unreadable
        await handlers.get_object(key=old.key, account_id="acc1", repo=repo, store=store, now=later)
    swept = await handlers.sweep_expired(now=later, batch=10, repo=repo, store=store)
    assert [o.key for o in swept] == [old.key] and swept[0].owner_ref == "j-old"
    assert await repo.get(old.key) is None and not await store.exists(old.key)
    for kept in (fresh, voice):
        assert await repo.get(kept.key) is not None and await store.exists(kept.key)
    assert await handlers.sweep_expired(now=later, batch=10, repo=repo, store=store) == []


class SlowDeletes:
    """Wraps a store so bucket deletes yield, letting two sweeps overlap."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.deleted: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def delete(self, key: str) -> None:
        await asyncio.sleep(0.01)
        self.deleted.append(key)
        await self.inner.delete(key)


async def test_concurrent_sweeps_never_delete_one_row_twice(repo: ObjectRepository, store: BlobStore) -> None:
    for i in range(24):
        await handlers.store_generated_audio(
            job_id=f"j{i}", account_id="acc1", created_at=NOW, wav=b"x", repo=repo, store=store, now=NOW
        )
    slow = SlowDeletes(store)
    later = NOW + timedelta(days=8)

    async def sweeper() -> list[str]:
        keys: list[str] = []
        while batch := await handlers.sweep_expired(now=later, batch=4, repo=repo, store=slow):  # type: ignore[arg-type]
            keys += [o.key for o in batch]
        return keys

    a, b = await asyncio.gather(sweeper(), sweeper())
    assert a and b, "both sweepers should have taken part"
    assert not set(a) & set(b)
    assert len(a) + len(b) == 24 and len(slow.deleted) == len(set(slow.deleted)) == 24
    assert await repo.keys_of_account("acc1") == []


async def test_purge_account_leaves_nothing_and_spares_others(repo: ObjectRepository, store: BlobStore) -> None:
    for account in ("acc1", "acc11"):
        await handlers.store_generated_audio(
            job_id="j1", account_id=account, created_at=NOW, wav=b"G", repo=repo, store=store, now=NOW
        )
        await handlers.store_voice_reference(account_id=account, voice_id="v1", wav=b"V", repo=repo, store=store)
        for purpose in ("upload", "voice_clone"):
            await handlers.store_upload(
                account_id=account, upload_id=f"{account}-{purpose}", purpose=purpose, data=b"U",
                content_type="audio/wav", repo=repo, store=store, now=NOW,
            )
    system = await handlers.store_voice_reference(account_id=None, voice_id="joe", wav=b"S", repo=repo, store=store)
    other_keys = await repo.keys_of_account("acc11")
    assert len(other_keys) == 4

    assert await handlers.purge_account(account_id="acc1", repo=repo, store=store) == 4

    assert await repo.keys_of_account("acc1") == []
    assert await repo.get_upload("acc1-upload") is None
    for prefix in ("voices/custom/acc1/", "generations/acc1/", "uploads/acc1/", "voice-recordings/acc1/"):
        assert await store.delete_prefix(prefix) == 0  # nothing left to delete
    assert await repo.keys_of_account("acc11") == other_keys
    assert all([await store.exists(k) for k in other_keys])
    assert await store.exists(system.key)


async def test_another_accounts_object_is_missing_to_get_and_presign(repo: ObjectRepository,
                                                                    store: BlobStore) -> None:
    """A bare key is not enough: the caller names the account, and another account's object does not exist for it;
    a system object (no owner) is readable by any account."""
    obj = await handlers.store_generated_audio(
        job_id=JOB, account_id="acc1", created_at=JOB_CREATED, wav=b"RIFF", repo=repo, store=store, now=NOW
    )
    for account in ("acc2", None):
        with pytest.raises(ObjectMissing):
            await handlers.get_object(key=obj.key, account_id=account, repo=repo, store=store, now=NOW)
        with pytest.raises(ObjectMissing):
            await handlers.presign(key=obj.key, account_id=account, repo=repo, store=store, now=NOW)
    assert await handlers.get_object(key=obj.key, account_id="acc1", repo=repo, store=store, now=NOW) == b"RIFF"
    system = await handlers.store_voice_reference(account_id=None, voice_id="sys1", wav=b"S", repo=repo, store=store)
    assert await handlers.get_object(key=system.key, account_id="acc2", repo=repo, store=store) == b"S"
    assert (await handlers.presign(key=system.key, account_id=None, repo=repo, store=store)).url
    # Nor can any account release a system object.
    assert await handlers.delete_objects(keys=[system.key], account_id="acc2", repo=repo, store=store) == 0
    assert await store.exists(system.key)


async def test_delete_objects(repo: ObjectRepository, store: BlobStore) -> None:
    obj = await handlers.store_voice_reference(account_id="acc1", voice_id="v1", wav=b"V", repo=repo, store=store)
    # Another account cannot release it.
    assert await handlers.delete_objects(keys=[obj.key], account_id="acc2", repo=repo, store=store) == 0
    assert await store.exists(obj.key)
    assert await handlers.delete_objects(keys=[obj.key], account_id="acc1", repo=repo, store=store) == 1
    assert await repo.get(obj.key) is None and not await store.exists(obj.key)
