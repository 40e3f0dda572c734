"""The storage service on the bus: commands and events translated to the handlers of `handlers.py`.

Serves (RPC): PutVoiceReference, PutUpload, GetUpload, GetObject, GetRendition, Presign (each checks the account).
Consumes: synthesis.completed (WAV body), voice.deleted, objects.released, account.purge_requested.
Emits: audio.stored, objects.expired, account.purged.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from timbre_common.audio import AudioError
from timbre_common.contracts import Envelope, utcnow
from timbre_common.contracts import storage as c
from timbre_common.contracts.accounts import AccountPurged, AccountPurgeRequested
from timbre_common.contracts.synthesis import SynthesisCompleted
from timbre_common.contracts.voices import VoiceDeleted
from timbre_common.logging import get_logger
from timbre_common.messaging import Invalid, NotFound, RpcError
from timbre_common.ports import MessageBus

from . import handlers
from .adapters.blob import BlobStore
from .adapters.repository import ObjectRepository
from .domain import AccountLimits, InvalidId, InvalidPurpose, ObjectExpired, ObjectMissing, QuotaExceeded, StoredObject

log = get_logger(__name__)


@asynccontextmanager
async def _domain_errors() -> AsyncIterator[None]:
    """Storage's domain errors as the RPC errors callers understand."""
    try:
        yield
    except ObjectExpired as exc:
        raise NotFound("object_expired", f"object expired: {exc}") from exc
    except ObjectMissing as exc:
        raise NotFound("object_not_found", f"no such object: {exc}") from exc
    except (InvalidId, InvalidPurpose) as exc:
        raise Invalid("invalid_storage_request", str(exc)) from exc
    except AudioError as exc:
        raise Invalid(exc.code, exc.message) from exc
    except QuotaExceeded as exc:
        raise RpcError(exc.code, exc.message, status=exc.status) from exc


def _reply(obj: StoredObject) -> c.StoredObject:
    return c.StoredObject(key=obj.key, size=obj.size, content_type=obj.content_type, expires_at=obj.expires_at,
                          retention=str(obj.retention))


async def put_voice_reference(cmd: c.PutVoiceReference, *, envelope: Envelope, body: bytes, repo: ObjectRepository,
                              store: BlobStore, limits: AccountLimits | None = None) -> c.StoredObject:
    async with _domain_errors():
        obj = await handlers.store_voice_reference(account_id=cmd.account_id, voice_id=cmd.voice_id, wav=body,
                                                   repo=repo, store=store, limits=limits, upload_id=cmd.upload_id)
    return _reply(obj)


async def _upload_record(upload: Any, obj: StoredObject, *, repo: ObjectRepository, store: BlobStore,
                         with_url: bool = True) -> c.UploadRecord:
    url = None
    if with_url:
        url = (await handlers.presign(key=obj.key, account_id=upload.account_id, repo=repo, store=store)).url
    return c.UploadRecord(upload_id=upload.upload_id, purpose=str(upload.purpose), key=obj.key, size=obj.size,
                          content_type=obj.content_type, created_at=upload.created_at, expires_at=obj.expires_at,
                          url=url)


async def put_upload(cmd: c.PutUpload, *, envelope: Envelope, body: bytes, repo: ObjectRepository,
                     store: BlobStore, limits: AccountLimits | None = None) -> c.UploadRecord:
    async with _domain_errors():
        await handlers.store_upload(account_id=cmd.account_id, upload_id=cmd.upload_id, purpose=cmd.purpose,
                                    data=body, content_type=cmd.content_type, filename=cmd.filename, repo=repo,
                                    store=store, limits=limits)
        upload, obj = await handlers.get_upload(account_id=cmd.account_id, upload_id=cmd.upload_id, repo=repo)
        return await _upload_record(upload, obj, repo=repo, store=store)


async def get_upload(cmd: c.GetUpload, *, envelope: Envelope, repo: ObjectRepository,
                     store: BlobStore) -> c.UploadRecord | tuple[c.UploadRecord, bytes]:
    try:
        async with _domain_errors():
            upload, obj = await handlers.get_upload(account_id=cmd.account_id, upload_id=cmd.upload_id, repo=repo)
            record = await _upload_record(upload, obj, repo=repo, store=store, with_url=not cmd.with_body)
            if cmd.with_body:
                return record, await handlers.get_object(key=obj.key, account_id=cmd.account_id, repo=repo,
                                                         store=store)
            return record
    except NotFound:
        raise NotFound("upload_not_found", f"upload {cmd.upload_id} not found") from None


async def get_object(cmd: c.GetObject, *, envelope: Envelope, repo: ObjectRepository,
                     store: BlobStore) -> tuple[c.StoredObject, bytes]:
    async with _domain_errors():
        data = await handlers.get_object(key=cmd.key, account_id=cmd.account_id, repo=repo, store=store)
        obj = await repo.get(cmd.key)
    assert obj is not None
    return _reply(obj), data


async def get_rendition(cmd: c.GetRendition, *, envelope: Envelope, repo: ObjectRepository,
                        store: BlobStore) -> tuple[c.StoredObject, bytes]:
    async with _domain_errors():
        obj, data = await handlers.get_rendition(account_id=cmd.account_id, key=cmd.key, fmt=cmd.format, repo=repo,
                                                 store=store)
    return _reply(obj), data


async def presign(cmd: c.Presign, *, envelope: Envelope, repo: ObjectRepository, store: BlobStore) -> c.PresignedUrl:
    async with _domain_errors():
        got = await handlers.presign(key=cmd.key, account_id=cmd.account_id, expires_in=cmd.expires_in, repo=repo,
                                     store=store)
    return c.PresignedUrl(url=got.url, url_expires_at=got.url_expires_at, object_expires_at=got.object_expires_at)


async def on_synthesis_completed(event: SynthesisCompleted, *, envelope: Envelope, body: bytes,
                                 repo: ObjectRepository, store: BlobStore, bus: MessageBus) -> None:
    """Write the WAV under the account's prefix (idempotent) and announce it."""
    async with bus.transaction():
        obj = await handlers.store_generated_audio(job_id=event.job_id, account_id=event.account_id,
                                                   created_at=event.job_created_at or envelope.occurred_at, wav=body,
                                                   repo=repo, store=store)
        # One id per completion message: its redelivery (on any replica) is dropped by the dispatcher's inbox,
        # while another attempt's late completion is announced, so the dispatcher can release audio nobody owns.
        await bus.publish(c.AudioStored(job_id=event.job_id, account_id=event.account_id, key=obj.key,
                                        size=obj.size, expires_at=obj.expires_at, synthesis_ms=event.synthesis_ms,
                                        audio_seconds=event.audio_seconds, words=event.details.get("words"),
                                        synthesized_at=envelope.occurred_at, stored_at=utcnow()),
                          message_id=f"audio.stored:{event.job_id}:{envelope.message_id}")


async def on_voice_deleted(event: VoiceDeleted, *, envelope: Envelope, repo: ObjectRepository,
                           store: BlobStore) -> None:
    await handlers.delete_voice_objects(account_id=event.account_id, reference_key=event.reference_key,
                                        voice_id=event.voice_id, repo=repo, store=store)


async def on_objects_released(event: c.ObjectsReleased, *, envelope: Envelope, repo: ObjectRepository,
                              store: BlobStore) -> None:
    await handlers.delete_objects(keys=event.keys, account_id=event.account_id, repo=repo, store=store)


async def on_account_purge(event: AccountPurgeRequested, *, envelope: Envelope, repo: ObjectRepository,
                           store: BlobStore, bus: MessageBus) -> None:
    async with bus.transaction():
        removed = await handlers.purge_account(account_id=event.account_id, repo=repo, store=store)
        await bus.publish(AccountPurged(account_id=event.account_id, purge_id=event.purge_id, service="storage",
                                        removed=removed), message_id=f"account.purged:{event.purge_id}:storage")


async def sweep(*, repo: ObjectRepository, store: BlobStore, bus: MessageBus, batch: int = 200) -> int:
    """Delete everything expired, batch by batch, telling owners what went."""
    total = 0
    while True:
        # The rows' deletion and objects.expired commit together: owners always learn what went.
        async with bus.transaction():
            gone = await handlers.sweep_expired(now=utcnow(), batch=batch, repo=repo, store=store)
            if gone:
                await bus.publish(c.ObjectsExpired(keys=[o.key for o in gone]))
        if not gone:
            return total
        total += len(gone)


