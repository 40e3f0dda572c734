"""ObjectRepository against PostgreSQL (fresh schema per test)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from timbre_storage.adapters.repository import ObjectRepository
from timbre_storage.domain import ObjectKind, RetentionClass, StoredObject, UploadPurpose

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def obj(key: str, *, account: str | None = "acc1", expires: datetime | None = None, size: int = 3) -> StoredObject:
    return StoredObject(
        key=key,
        size=size,
        expires_at=expires,
        account_id=account,
        kind=ObjectKind.GENERATION,
        retention=RetentionClass.TTS_AUDIO,
        content_type="audio/wav",
        created_at=NOW,
        owner_ref="job",
    )


async def test_record_get_delete(repo: ObjectRepository) -> None:
    stored = await repo.record(obj("generations/acc1/a.wav", expires=NOW + timedelta(days=7)))
    assert stored == obj("generations/acc1/a.wav", expires=NOW + timedelta(days=7))
    assert await repo.get("generations/acc1/a.wav") == stored
    assert await repo.delete("generations/acc1/a.wav") is True
    assert await repo.get("generations/acc1/a.wav") is None
    assert await repo.delete("generations/acc1/a.wav") is False


async def test_rerecord_keeps_first_expiry(repo: ObjectRepository) -> None:
    first = await repo.record(obj("k/a.wav", expires=NOW + timedelta(days=7)))
    again = await repo.record(obj("k/a.wav", expires=NOW + timedelta(days=9), size=5))
    assert again.expires_at == first.expires_at and again.size == 5


async def test_claim_expired_takes_only_expired_rows(repo: ObjectRepository) -> None:
    await repo.record(obj("k/old.wav", expires=NOW - timedelta(seconds=1)))
    await repo.record(obj("k/now.wav", expires=NOW))
    await repo.record(obj("k/new.wav", expires=NOW + timedelta(seconds=1)))
    await repo.record(obj("k/forever.wav", expires=None))
    async with repo.claim_expired(NOW, 10) as claimed:
        assert sorted(o.key for o in claimed) == ["k/now.wav", "k/old.wav"]
    assert await repo.get("k/old.wav") is None
    assert await repo.get("k/new.wav") is not None and await repo.get("k/forever.wav") is not None


async def test_claim_rolls_back_when_the_block_fails(repo: ObjectRepository) -> None:
    await repo.record(obj("k/old.wav", expires=NOW - timedelta(days=1)))
    with pytest.raises(RuntimeError):
        async with repo.claim_expired(NOW, 10) as claimed:
            assert len(claimed) == 1
            raise RuntimeError("bucket unavailable")
    assert await repo.get("k/old.wav") is not None


async def test_concurrent_claims_are_disjoint(repo: ObjectRepository) -> None:
    for i in range(20):
        await repo.record(obj(f"k/{i:02}.wav", expires=NOW - timedelta(minutes=i)))
    first_claimed = asyncio.Event()

    async def hold_first() -> list[str]:
        async with repo.claim_expired(NOW, 8) as claimed:
            first_claimed.set()
            await asyncio.sleep(0.2)  # keep the rows locked while the other sweeper claims
            return [o.key for o in claimed]

    async def second() -> list[str]:
        await first_claimed.wait()
        async with repo.claim_expired(NOW, 100) as claimed:
            return [o.key for o in claimed]

    a, b = await asyncio.gather(hold_first(), second())
    assert len(a) == 8 and len(b) == 12
    assert not set(a) & set(b)


async def test_uploads_and_delete_account(repo: ObjectRepository) -> None:
    up = obj("uploads/acc1/x-u1.wav")
    upload = await repo.record_upload(up, upload_id="u1", purpose=UploadPurpose.STT_INPUT)
    assert (upload.account_id, upload.purpose, upload.key) == ("acc1", UploadPurpose.STT_INPUT, up.key)
    assert await repo.get_upload("u1") == upload
    await repo.record(obj("generations/acc1/a.wav"))
    await repo.record(obj("generations/acc2/b.wav", account="acc2"))
    await repo.record(obj("voices/system/v.wav", account=None))
    assert sorted(await repo.delete_account("acc1")) == ["generations/acc1/a.wav", "uploads/acc1/x-u1.wav"]
    assert await repo.get_upload("u1") is None
    assert await repo.keys_of_account("acc2") == ["generations/acc2/b.wav"]
    assert await repo.get("voices/system/v.wav") is not None


async def test_deleting_an_object_drops_its_upload_row(repo: ObjectRepository) -> None:
    up = obj("uploads/acc1/x-u2.wav")
    await repo.record_upload(up, upload_id="u2", purpose=UploadPurpose.UPLOAD)
    await repo.delete(up.key)
    assert await repo.get_upload("u2") is None
