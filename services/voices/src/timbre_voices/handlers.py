"""Voices service handlers.

Serves (RPC): RegisterVoice, ListVoices, GetVoice, DeleteVoice.
Consumes: voice.profiled (a worker's per-voice profile), account.purge_requested.
Emits: voice.registered, voice.deleted, account.purged.
Calls: storage (PutVoiceReference, GetUpload, Presign).
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

from timbre_common.audio import AudioError, normalise_reference, quality_report, validate_reference
from timbre_common.catalogue import KNOWN_BACKENDS, system_voice_by_id
from timbre_common.contracts import Envelope
from timbre_common.contracts.accounts import AccountPurged, AccountPurgeRequested
from timbre_common.contracts.storage import (
    GetUpload,
    ObjectsReleased,
    Presign,
    PresignedUrl,
    PutVoiceReference,
    StoredObject,
)
from timbre_common.contracts.voices import (
    DeleteVoice,
    GetVoice,
    ListVoices,
    RegisterVoice,
    VoiceDeleted,
    VoiceList,
    VoiceProfiled,
    VoiceRecord,
    VoiceRegistered,
)
from timbre_common.ids import is_canonical_uuid
from timbre_common.logging import get_logger
from timbre_common.messaging import Conflict, Invalid, NotFound, RpcError, voice_profile_routing_key
from timbre_common.ports import MessageBus
from timbre_common.text import SUPPORTED_LANGUAGES, unstorable_characters

from . import domain
from .adapters.repository import VoiceRepository
from .settings import VoicesSettings

log = get_logger(__name__)


def _analyse(body: bytes, settings: VoicesSettings) -> tuple[Any, dict[str, Any], bytes]:
    """Validate, grade and normalise a reference (CPU work, run in a thread)."""
    info = validate_reference(body, min_s=settings.min_reference_s, max_s=settings.max_reference_s,
                              max_bytes=settings.max_reference_bytes)
    return info, quality_report(body).to_dict(), normalise_reference(body, target_sr=settings.reference_sample_rate)


def _voice_limit(settings: VoicesSettings) -> Conflict:
    return Conflict("voice_limit_reached", f"this account has {settings.max_voices_per_account} custom voices, "
                    "its limit; delete one first")


def _voice_not_found(voice_id: str) -> NotFound:
    return NotFound("voice_not_found", f"voice {voice_id} not found")


async def register_voice(cmd: RegisterVoice, *, envelope: Envelope, body: bytes | None, repo: VoiceRepository,
                         bus: MessageBus, settings: VoicesSettings) -> VoiceRecord:
    """Validate the reference deeply, store it, record the voice, announce it."""
    name = cmd.name.strip()
    if not name:
        raise RpcError("missing_field", "name is required", status=400)
    if len(name) > domain.NAME_MAX:
        raise Invalid("invalid_name", f"name is longer than {domain.NAME_MAX} characters")
    if cmd.backend not in KNOWN_BACKENDS:
        raise Invalid("invalid_backend", f"backend must be one of {', '.join(KNOWN_BACKENDS)}")
    if cmd.lang not in SUPPORTED_LANGUAGES:
        raise Invalid("unsupported_language", f"lang must be one of {' '.join(SUPPORTED_LANGUAGES)}")
    if cmd.ref_text and len(cmd.ref_text) > domain.REF_TEXT_MAX:
        raise Invalid("invalid_ref_text", f"ref_text is longer than {domain.REF_TEXT_MAX} characters")
    if cmd.family and len(cmd.family) > domain.FAMILY_MAX:
        raise Invalid("invalid_family", f"family is longer than {domain.FAMILY_MAX} characters")
    for field, value in (("name", name), ("ref_text", cmd.ref_text), ("family", cmd.family)):
        problem = unstorable_characters(value or "")
        if problem:
            raise Invalid("invalid_field", f"{field} {problem}")
    # Cheap first: a full account is refused before its audio is analysed (the insert checks again, atomically).
    if await repo.count(cmd.account_id) >= settings.max_voices_per_account:
        raise _voice_limit(settings)
    upload_meta: dict[str, str] = {}
    if cmd.upload_id:
        if body:
            raise RpcError("conflicting_fields", "send ref_audio or upload_id, not both", status=400)
        upload, body = await bus.call("storage", GetUpload(account_id=cmd.account_id, upload_id=cmd.upload_id,
                                                           with_body=True))
        upload_meta = {"upload_id": cmd.upload_id, "upload_purpose": upload.purpose}
    if not body:
        raise RpcError("missing_field", "ref_audio is required", status=400)
    try:
        # Seconds of CPU for a long stereo reference: off the event loop, so other requests keep flowing.
        info, quality, normalised = await asyncio.to_thread(_analyse, body, settings)
    except AudioError as exc:
        raise Invalid(exc.code, exc.message) from exc
    voice_id = str(uuid.uuid4())
    # Made from an upload, the voice claims it: the upload stops expiring and goes with the voice.
    stored, _ = await bus.call("storage", PutVoiceReference(account_id=cmd.account_id, voice_id=voice_id,
                                                            upload_id=cmd.upload_id or None),
                               body=normalised, expect=StoredObject)
    metadata = {
        "original": {"sample_rate": info.sample_rate, "channels": info.channels, "bits": info.bits_per_sample,
                     "format": info.format, "duration_s": round(info.duration_s, 3), "bytes": len(body)},
        **upload_meta,
    }
    reference_url: str | None = None
    try:
        url, _ = await bus.call("storage", Presign(key=stored.key, account_id=cmd.account_id, expires_in=3600),
                                expect=PresignedUrl)
        reference_url = url.url
    except Exception:
        # The voice will exist unannounced; its profile is an optimisation the backend redoes on its first job.
        log.warning("voice_registration_not_announced", voice_id=voice_id, exc_info=True)
    try:
        async with bus.transaction():  # the voice and voice.registered commit together
            row = await repo.add(voice_id=voice_id, account_id=cmd.account_id, name=name, backend=cmd.backend,
                                 lang=cmd.lang, ref_text=(cmd.ref_text or None), family=(cmd.family or None),
                                 reference_key=stored.key, quality=quality, metadata=metadata,
                                 max_voices=settings.max_voices_per_account)
            if row is not None and reference_url is not None:
                await bus.publish(VoiceRegistered(voice_id=voice_id, account_id=cmd.account_id,
                                                  backend=cmd.backend, lang=cmd.lang, reference_key=stored.key,
                                                  reference_url=reference_url, ref_text=cmd.ref_text),
                                  routing_key=voice_profile_routing_key(cmd.backend))
    except Exception:
        # No voice, so no reason to keep its (permanent) reference: release it, then report the failure.
        await bus.publish(ObjectsReleased(account_id=cmd.account_id, keys=[stored.key]))
        raise
    if row is None:
        await bus.publish(ObjectsReleased(account_id=cmd.account_id, keys=[stored.key]))
        raise _voice_limit(settings)
    log.info("voice_registered", voice_id=voice_id, account_id=cmd.account_id, backend=cmd.backend,
             grade=quality.get("grade"))
    return domain.custom_record(row)


async def list_voices(cmd: ListVoices, *, envelope: Envelope, repo: VoiceRepository) -> VoiceList:
    """System voices first, then a page of the account's own; a cursor when more follow."""
    limit = max(1, min(cmd.limit, domain.LIST_LIMIT_MAX))
    if cmd.after is not None and not is_canonical_uuid(cmd.after):
        raise Invalid("invalid_cursor", "cursor is not one this API handed out")
    rows = await repo.list(cmd.account_id, limit=limit + 1, after=cmd.after)
    page, more = rows[:limit], len(rows) > limit
    system = domain.system_records() if cmd.after is None else []
    return VoiceList(voices=[*system, *(domain.custom_record(r) for r in page)],
                     next_after=str(page[-1]["voice_id"]) if more else None)


async def get_voice(cmd: GetVoice, *, envelope: Envelope, repo: VoiceRepository) -> VoiceRecord:
    """A system voice, or the account's own custom voice; anything else is not found."""
    system = domain.find_system_record(cmd.voice_id)
    if system is not None:
        return system
    if not is_canonical_uuid(cmd.voice_id):
        raise _voice_not_found(cmd.voice_id)
    row = await repo.get(cmd.account_id, cmd.voice_id)
    if row is None:
        raise _voice_not_found(cmd.voice_id)
    return domain.custom_record(row)


async def delete_voice(cmd: DeleteVoice, *, envelope: Envelope, repo: VoiceRepository, bus: MessageBus) -> None:
    """Forget the voice and announce it: storage drops the reference, the dispatcher the jobs and cache."""
    if system_voice_by_id(cmd.voice_id) is not None:
        raise RpcError("system_voice_readonly", "system voices cannot be deleted", status=403)
    if not is_canonical_uuid(cmd.voice_id):
        raise _voice_not_found(cmd.voice_id)
    row = await repo.get(cmd.account_id, cmd.voice_id)
    if row is None:
        raise _voice_not_found(cmd.voice_id)
    # The row's deletion and voice.deleted commit together: a lost announcement would leave its audio forever.
    async with bus.transaction():
        await bus.publish(VoiceDeleted(voice_id=cmd.voice_id, account_id=cmd.account_id,
                                       reference_key=row["reference_key"]))
        await repo.delete(cmd.account_id, cmd.voice_id)
    log.info("voice_deleted", voice_id=cmd.voice_id, account_id=cmd.account_id)


async def on_voice_profiled(event: VoiceProfiled, *, envelope: Envelope, repo: VoiceRepository) -> None:
    """Keep what a worker computed for the voice (e.g. the nearest bundled voice)."""
    if not await repo.set_profile(event.voice_id, event.backend, event.profile):
        log.info("voice_profile_for_unknown_voice", voice_id=event.voice_id)


async def on_account_purge(event: AccountPurgeRequested, *, envelope: Envelope, repo: VoiceRepository,
                           bus: MessageBus) -> None:
    """Delete every voice of the account and confirm."""
    async with bus.transaction():
        rows = await repo.delete_account(event.account_id)
        await bus.publish(AccountPurged(account_id=event.account_id, purge_id=event.purge_id, service="voices",
                                        removed=len(rows)))
