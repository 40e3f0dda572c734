"""Storage service layer: the only writer of the bucket and its object index.

The bus side (bus_adapters.py) maps messages onto these functions:
  synthesis.completed.v1      -> store_generated_audio   (then emits audio.stored.v1: key, size, expires_at)
  RPC PutVoiceReference       -> store_voice_reference   (from voices)
  RPC PutUpload / GetUpload   -> store_upload, get_upload (from the gateway, voices)
  RPC GetObject / Presign     -> get_object, presign     (from the dispatcher, voices)
  voice.deleted.v1, objects.released.v1 -> delete_objects (an owner's own objects only)
  account.purge_requested.v1  -> purge_account           (then emits account.purged.v1)
  the sweeper's timer         -> sweep_expired           (then emits objects.expired.v1 with the keys)

Every write is idempotent: a redelivered message writes the same key and answers the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from timbre_common.audio import transcode
from timbre_storage.adapters.blob import BlobStore
from timbre_storage.adapters.repository import ObjectRepository, Upload
from timbre_storage.domain import (
    AccountLimits,
    InvalidId,
    ObjectExpired,
    ObjectKind,
    ObjectMissing,
    RetentionClass,
    StoredObject,
    UploadPurpose,
    account_prefixes,
    check_ext,
    check_id,
    check_key,
    expires_at,
    ext_for_content_type,
    generation_key,
    rendition_key,
    renditions_of,
    upload_key,
    voice_key,
)

DEFAULT_URL_SECONDS = 3600


class PresignedGet(NamedTuple):
    """A download URL, when it stops working, and when the object itself expires."""

    url: str
    url_expires_at: datetime
    object_expires_at: datetime | None


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


async def _write(obj: StoredObject, data: bytes, *, repo: ObjectRepository, store: BlobStore) -> StoredObject:
    # Index first: every byte in the bucket is then known to the sweeper and the purge.
    recorded = await repo.record(obj)
    await store.put(obj.key, data, obj.content_type)
    return recorded


async def store_generated_audio(
    *,
    job_id: str,
    account_id: str,
    created_at: datetime,
    wav: bytes,
    repo: ObjectRepository,
    store: BlobStore,
    content_type: str = "audio/wav",
    ext: str = "wav",
    now: datetime | None = None,
) -> StoredObject:
    """Store a job's audio under the account's generations/ prefix with the 7-day TTS retention."""
    key = generation_key(account_id, job_id, created_at, check_ext(ext))
    existing = await repo.get(key)
    if existing is not None and await store.exists(key):
        return existing  # redelivered completion: first write wins
    moment = _now(now)
    obj = StoredObject(
        key=key,
        size=len(wav),
        expires_at=expires_at(RetentionClass.TTS_AUDIO, moment),
        account_id=account_id,
        kind=ObjectKind.GENERATION,
        retention=RetentionClass.TTS_AUDIO,
        content_type=content_type,
        created_at=moment,
        owner_ref=job_id,
    )
    return await _write(obj, wav, repo=repo, store=store)


async def store_voice_reference(
    *,
    account_id: str | None,
    voice_id: str,
    wav: bytes,
    repo: ObjectRepository,
    store: BlobStore,
    retention: RetentionClass = RetentionClass.VOICE_REFERENCE,
    now: datetime | None = None,
    limits: AccountLimits | None = None,
    upload_id: str | None = None,
) -> StoredObject:
    """Store a voice's reference audio (system when account_id is None); permanent; rewrite replaces.

    Within the account's byte cap (`limits`); `upload_id` names the voice_clone upload it was made from, which
    the voice claims (it stops expiring and goes with the voice)."""
    if retention not in (RetentionClass.VOICE_REFERENCE, RetentionClass.BUILT_VOICE):
        raise ValueError(f"a voice reference cannot have retention {retention}")
    obj = StoredObject(
        key=voice_key(account_id, voice_id),
        size=len(wav),
        expires_at=None,
        account_id=account_id,
        kind=ObjectKind.SYSTEM_VOICE if account_id is None else ObjectKind.CUSTOM_VOICE,
        retention=retention,
        content_type="audio/wav",
        created_at=_now(now),
        owner_ref=voice_id,
    )
    recorded = await repo.record(obj, limits=limits)
    await store.put(obj.key, wav, obj.content_type)
    if upload_id is not None and account_id is not None:
        await repo.claim_upload(account_id, check_id(upload_id, "upload_id"), voice_id)
    return recorded


async def store_upload(
    *,
    account_id: str,
    upload_id: str,
    purpose: UploadPurpose | str | None,
    data: bytes,
    content_type: str,
    repo: ObjectRepository,
    store: BlobStore,
    filename: str | None = None,
    now: datetime | None = None,
    limits: AccountLimits | None = None,
) -> StoredObject:
    """Store a client upload: voice_clone under voice-recordings/ (kept a day unless a voice claims it), others
    under uploads/ (30 days); within the account's caps (`limits`). The extension comes from the content
    type, never from the client's file name."""
    purpose = UploadPurpose.parse(purpose)
    check_id(account_id, "account_id")
    check_id(upload_id, "upload_id")
    previous = await repo.get_upload(upload_id)
    if previous is not None:
        if previous.account_id != account_id:
            raise InvalidId(f"upload_id {upload_id!r} belongs to another account")
        existing = await repo.get(previous.key)
        if existing is not None and await store.exists(previous.key):
            return existing
    moment = previous.created_at if previous is not None else _now(now)
    retention = purpose.retention
    key = previous.key if previous is not None else upload_key(
        account_id, upload_id, purpose, moment, ext_for_content_type(content_type)
    )
    expiry = expires_at(retention, moment)
    if purpose is UploadPurpose.VOICE_CLONE and limits is not None:
        expiry = moment + limits.voice_clone_ttl
    obj = StoredObject(
        key=key,
        size=len(data),
        expires_at=expiry,
        account_id=account_id,
        kind=ObjectKind.VOICE_RECORDING if purpose is UploadPurpose.VOICE_CLONE else ObjectKind.UPLOAD,
        retention=retention,
        content_type=content_type,
        created_at=moment,
        owner_ref=upload_id,
    )
    await repo.record_upload(obj, upload_id=upload_id, purpose=purpose, limits=limits)
    await store.put(key, data, content_type)
    recorded = await repo.get(key)
    assert recorded is not None
    return recorded


_ANY_OWNER = object()


async def _live(key: str, repo: ObjectRepository, now: datetime, account_id: Any = _ANY_OWNER) -> StoredObject:
    """The indexed, unexpired object; with `account_id`, only if that account owns it or it is a system object
    (no owner). Another account's object is missing, exactly like one that does not exist."""
    obj = await repo.get(check_key(key))
    if obj is None:
        raise ObjectMissing(key)
    if account_id is not _ANY_OWNER and obj.account_id is not None and obj.account_id != account_id:
        raise ObjectMissing(key)
    if obj.expires_at is not None and obj.expires_at <= now:
        raise ObjectExpired(key)
    return obj


async def get_object(
    *, key: str, account_id: str | None, repo: ObjectRepository, store: BlobStore, now: datetime | None = None
) -> bytes:
    """The object's bytes, for its owner (any caller for a system object); ObjectMissing when unindexed, another
    account's, expired, or indexed but gone from the bucket."""
    await _live(key, repo, _now(now), account_id)
    return await store.get(key)


async def get_rendition(
    *, account_id: str, key: str, fmt: str, repo: ObjectRepository, store: BlobStore, now: datetime | None = None
) -> tuple[StoredObject, bytes]:
    """A generated audio object of the account in `fmt`: encoded on the first request, then read back.

    The rendition lives beside its source with the source's expiry, so the sweeper, a release of the source and
    the account purge remove it with the source.
    """
    moment = _now(now)
    source = await _live(key, repo, moment)
    if source.account_id != account_id or source.kind is not ObjectKind.GENERATION:
        raise ObjectMissing(key)
    if fmt == "wav":
        return source, await store.get(key)
    target = rendition_key(key, fmt)
    kept = await repo.get(target)
    if kept is not None and await store.exists(target):
        return kept, await store.get(target)
    # Seconds of CPU for minutes of mp3 or opus: once per format and job, off the event loop.
    body, content_type = await asyncio.to_thread(transcode, await store.get(key), fmt)
    obj = StoredObject(
        key=target,
        size=len(body),
        expires_at=source.expires_at,
        account_id=account_id,
        kind=ObjectKind.GENERATION,
        retention=source.retention,
        content_type=content_type,
        created_at=moment,
        owner_ref=source.owner_ref,
    )
    return await _write(obj, body, repo=repo, store=store), body


async def get_upload(
    *, account_id: str, upload_id: str, repo: ObjectRepository, now: datetime | None = None
) -> tuple[Upload, StoredObject]:
    """An upload of the account and its object; ObjectMissing if unknown, another account's, or expired."""
    upload = await repo.get_upload(check_id(upload_id, "upload_id"))
    if upload is None or upload.account_id != account_id:
        raise ObjectMissing(upload_id)
    return upload, await _live(upload.key, repo, _now(now))


async def presign(
    *,
    key: str,
    account_id: str | None,
    repo: ObjectRepository,
    store: BlobStore,
    expires_in: int = DEFAULT_URL_SECONDS,
    now: datetime | None = None,
) -> PresignedGet:
    """A download URL for the object's owner (any caller for a system object) and when it stops working (never
    after the object itself expires)."""
    moment = _now(now)
    obj = await _live(key, repo, moment, account_id)
    if not await store.exists(key):
        raise ObjectMissing(key)
    if obj.expires_at is not None:
        expires_in = min(expires_in, max(1, int((obj.expires_at - moment).total_seconds())))
    url = await store.presign_get(key, expires_in)
    return PresignedGet(url, moment + timedelta(seconds=expires_in), obj.expires_at)


async def _owned_by(key: str, account_id: str | None, repo: ObjectRepository) -> bool:
    obj = await repo.get(key)
    if obj is not None:
        return obj.account_id == account_id
    return account_id is not None and key.startswith(tuple(account_prefixes(account_id)))


async def delete_objects(
    *, keys: Iterable[str], account_id: str | None, repo: ObjectRepository, store: BlobStore
) -> int:
    """Delete objects from the bucket, then their index rows: only `account_id`'s keys (None: system objects).

    A generated WAV takes its renditions (other formats of it) with it."""
    removed = 0
    for key in keys:
        check_key(key)
        if not await _owned_by(key, account_id, repo):
            continue  # an owner may only release its own objects
        for target in (key, *renditions_of(key)):
            await store.delete(target)
            removed += await repo.delete(target)
    return removed


async def delete_voice_objects(
    *, account_id: str, reference_key: str | None, voice_id: str, repo: ObjectRepository, store: BlobStore
) -> int:
    """A deleted voice's reference and the uploads it claimed."""
    keys = [reference_key] if reference_key else []
    keys += await repo.claimed_upload_keys(account_id, voice_id)
    return await delete_objects(keys=keys, account_id=account_id, repo=repo, store=store)


async def sweep_expired(
    *, now: datetime | None = None, batch: int = 200, repo: ObjectRepository, store: BlobStore
) -> list[StoredObject]:
    """Delete one batch of expired objects (bucket first, index row committed after); returns them."""
    async with repo.claim_expired(_now(now), batch) as claimed:
        for obj in claimed:
            await store.delete(obj.key)
    return claimed


async def purge_account(*, account_id: str, repo: ObjectRepository, store: BlobStore) -> int:
    """Delete every object under the account's prefixes and every index row of the account."""
    deleted = 0
    for prefix in account_prefixes(account_id):
        deleted += await store.delete_prefix(prefix)
    prefixes = tuple(account_prefixes(account_id))
    for key in await repo.delete_account(account_id):
        if not key.startswith(prefixes):  # defensive: a row outside the account's prefixes
            await store.delete(key)
            deleted += 1
    return deleted
