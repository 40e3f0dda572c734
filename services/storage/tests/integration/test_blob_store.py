"""The same bucket contract against both backends: fs in a temp dir, s3 against a moto server."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from timbre_storage.adapters.blob import BlobStore, FsBlobStore, S3BlobStore
from timbre_storage.domain import InvalidId, ObjectMissing


async def test_put_get_exists_delete(store: BlobStore) -> None:
    key = "generations/acc1/2026/01/02/030405-job1.wav"
    assert not await store.exists(key)
    await store.put(key, b"RIFF-one", "audio/wav")
    assert await store.exists(key)
    assert await store.get(key) == b"RIFF-one"
    await store.put(key, b"RIFF-two", "audio/wav")  # overwrite
    assert await store.get(key) == b"RIFF-two"
    await store.delete(key)
    assert not await store.exists(key)
    await store.delete(key)  # deleting a missing object is fine


async def test_get_missing_raises_object_missing(store: BlobStore) -> None:
    with pytest.raises(ObjectMissing):
        await store.get("generations/acc1/nope.wav")


@pytest.mark.parametrize("key", ["../escape.wav", "a/../../b", "/etc/passwd", "a//b", "a/.hidden"])
async def test_keys_cannot_escape(store: BlobStore, key: str) -> None:
    with pytest.raises(InvalidId):
        await store.put(key, b"x", "audio/wav")
    with pytest.raises(InvalidId):
        await store.get(key)


async def test_delete_prefix_only_touches_the_prefix(store: BlobStore) -> None:
    mine = [f"generations/acc1/2026/01/0{d}/000000-j{i}.wav" for d in (1, 2) for i in range(4)]
    others = ["generations/acc10/2026/01/01/000000-j0.wav", "uploads/acc1/2026/01/01/000000-u.wav"]
    await asyncio.gather(*(store.put(k, b"x", "audio/wav") for k in mine + others))
    assert await store.delete_prefix("generations/acc1/") == len(mine)
    assert not any([await store.exists(k) for k in mine])
    assert all([await store.exists(k) for k in others])
    assert await store.delete_prefix("generations/acc1/") == 0
    with pytest.raises(ValueError):
        await store.delete_prefix("")


async def test_s3_delete_prefix_paginates_and_batches(s3_store: S3BlobStore) -> None:
    small = S3BlobStore(
        bucket=s3_store.bucket,
        endpoint_url=s3_store.endpoint_url,
        region=s3_store.region,
        access_key_id="test-access-key",
        secret_access_key="test-secret-key",
        page_size=2,
        delete_batch=3,
    )
    async with small:
        calls: list[int] = []
        original = small.client.delete_objects

        async def counting(**kwargs: object) -> object:
            calls.append(len(kwargs["Delete"]["Objects"]))  # type: ignore[index]
            return await original(**kwargs)

        small.client.delete_objects = counting  # type: ignore[method-assign]
        keys = [f"uploads/acc2/2026/01/01/00000{i}-u{i}.wav" for i in range(7)]
        await asyncio.gather(*(small.put(k, b"x", "audio/wav") for k in keys))
        assert await small.delete_prefix("uploads/acc2/") == 7
        assert calls == [3, 3, 1]
        listing = await small.client.list_objects_v2(Bucket=small.bucket, Prefix="uploads/acc2/")
        assert listing.get("KeyCount", 0) == 0


async def test_presigned_url_downloads_the_bytes(store: BlobStore) -> None:
    key = "voices/system/joe.wav"
    await store.put(key, b"RIFF-voice", "audio/wav")
    url = await store.presign_get(key)
    if isinstance(store, FsBlobStore):
        from timbre_storage.adapters.http import build_http_app

        transport = httpx.ASGITransport(app=build_http_app(store))
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get(url)
    else:
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
    assert response.status_code == 200
    assert response.content == b"RIFF-voice"
    assert response.headers["content-type"].startswith("audio/wav")
