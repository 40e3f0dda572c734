"""Voices handlers with fakes: validation codes, system voices, ownership, profiles, purges."""
from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from timbre_common.audio import parse_wav
from timbre_common.catalogue import SYSTEM_VOICES
from timbre_common.contracts.accounts import AccountPurged, AccountPurgeRequested
from timbre_common.contracts.storage import (
    GetUpload,
    ObjectsReleased,
    Presign,
    PresignedUrl,
    PutVoiceReference,
    StoredObject,
    UploadRecord,
)
from timbre_common.contracts.voices import (
    DeleteVoice,
    GetVoice,
    ListVoices,
    RegisterVoice,
    VoiceDeleted,
    VoiceProfiled,
    VoiceRecord,
    VoiceRegistered,
)
from timbre_common.messaging import Invalid, NotFound, RemoteError, RpcError
from timbre_common.testing import FakeBus, envelope, load_module
from timbre_voices import handlers
from timbre_voices.settings import VoicesSettings

wavs = load_module("timbre_hostile_wavs", Path(__file__).resolve().parents[4] / "libs/common/tests/hostile_wavs.py")

ACCOUNT, OTHER = "acc-1", "acc-2"
ENV = envelope()
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class FakeVoiceRepository:
    """Implements VoiceRepository on dicts; rows are snapshots, as database rows are."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self._tick = 0

    async def add(self, *, voice_id: str, account_id: str, name: str, backend: str, lang: str,
                  ref_text: str | None, family: str | None, reference_key: str, quality: dict[str, Any],
                  metadata: dict[str, Any], max_voices: int | None = None) -> dict[str, Any] | None:
        if max_voices is not None and await self.count(account_id) >= max_voices:
            return None
        self._tick += 1
        self.rows[voice_id] = {"voice_id": uuid.UUID(voice_id), "account_id": account_id, "name": name,
                               "backend": backend, "lang": lang, "ref_text": ref_text, "family": family,
                               "reference_key": reference_key, "quality": quality, "profile": {},
                               "metadata": metadata, "created_at": NOW + timedelta(seconds=self._tick)}
        return copy.deepcopy(self.rows[voice_id])

    async def count(self, account_id: str) -> int:
        return sum(1 for r in self.rows.values() if r["account_id"] == account_id)

    async def get(self, account_id: str, voice_id: str) -> dict[str, Any] | None:
        row = self.rows.get(voice_id)
        return copy.deepcopy(row) if row and row["account_id"] == account_id else None

    async def list(self, account_id: str, *, limit: int, after: str | None = None) -> list[dict[str, Any]]:
        rows = sorted((r for r in self.rows.values() if r["account_id"] == account_id),
                      key=lambda r: (r["created_at"], str(r["voice_id"])))
        if after is not None:
            keys = [str(r["voice_id"]) for r in rows]
            rows = rows[keys.index(after) + 1:] if after in keys else []
        return copy.deepcopy(rows[:limit])

    async def delete(self, account_id: str, voice_id: str) -> dict[str, Any] | None:
        row = self.rows.get(voice_id)
        if row is None or row["account_id"] != account_id:
            return None
        return self.rows.pop(voice_id)

    async def set_profile(self, voice_id: str, backend: str, profile: dict[str, Any]) -> bool:
        row = self.rows.get(voice_id)
        if row is None:
            return False
        row["profile"] = {**row["profile"], backend: copy.deepcopy(profile)}  # jsonb ||: one key per backend
        return True

    async def delete_account(self, account_id: str) -> list[dict[str, Any]]:
        gone = [v for v, r in self.rows.items() if r["account_id"] == account_id]
        return [self.rows.pop(v) for v in gone]


class FakeStorage:
    """The storage service's answers: references stored by key, uploads by id."""

    def __init__(self, bus: FakeBus) -> None:
        self.objects: dict[str, bytes] = {}
        self.uploads: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.claimed: dict[str, str] = {}
        bus.on(PutVoiceReference, self._put_reference)
        bus.on(GetUpload, self._get_upload)
        bus.on(Presign, self._presign)

    async def _put_reference(self, cmd: PutVoiceReference, body: bytes | None) -> StoredObject:
        key = f"voices/custom/{cmd.account_id}/{cmd.voice_id}.wav"
        self.objects[key] = body or b""
        if cmd.upload_id:
            self.claimed[cmd.upload_id] = cmd.voice_id
        return StoredObject(key=key, size=len(body or b""), retention="permanent")

    async def _get_upload(self, cmd: GetUpload, body: bytes | None) -> tuple[UploadRecord, bytes | None]:
        if (cmd.account_id, cmd.upload_id) not in self.uploads:
            raise RemoteError("upload_not_found", f"upload {cmd.upload_id} not found", status=404)
        purpose, data = self.uploads[(cmd.account_id, cmd.upload_id)]
        record = UploadRecord(upload_id=cmd.upload_id, purpose=purpose, key=f"uploads/{cmd.account_id}/x",
                              size=len(data), content_type="audio/wav", created_at=NOW)
        return record, (data if cmd.with_body else None)

    async def _presign(self, cmd: Presign, body: bytes | None) -> PresignedUrl:
        return PresignedUrl(url=f"https://blobs.test/{cmd.key}", url_expires_at=NOW + timedelta(hours=1))


class World:
    def __init__(self) -> None:
        self.bus = FakeBus()
        self.repo = FakeVoiceRepository()
        self.storage = FakeStorage(self.bus)
        self.settings = VoicesSettings()

    async def register(self, body: bytes | None = None, *, account: str = ACCOUNT,
                       **fields: Any) -> VoiceRecord:
        defaults = {"account_id": account, "name": "Narrator", "backend": "qwen3-0.6b", "lang": "en"}
        cmd = RegisterVoice(**{**defaults, **fields})
        return await handlers.register_voice(cmd, envelope=ENV, body=body, repo=self.repo, bus=self.bus,
                                             settings=self.settings)

    async def get(self, voice_id: str, account: str = ACCOUNT) -> VoiceRecord:
        return await handlers.get_voice(GetVoice(account_id=account, voice_id=voice_id), envelope=ENV,
                                        repo=self.repo)

    async def delete(self, voice_id: str, account: str = ACCOUNT) -> None:
        await handlers.delete_voice(DeleteVoice(account_id=account, voice_id=voice_id), envelope=ENV,
                                    repo=self.repo, bus=self.bus)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def reference() -> bytes:
    """Eight seconds of a speech-like signal, stereo 44.1 kHz: normalised to mono 24 kHz on the way in."""
    return wavs.valid_wav(8.0, sample_rate=44100, channels=2)


# Registration -------------------------------------------------------------------------------------------

async def test_a_valid_reference_becomes_a_voice_normalised_stored_and_announced(world: World,
                                                                                 reference: bytes) -> None:
    record = await world.register(reference, ref_text="Words of the reference.", family="narrators")

    assert record.kind == "custom" and record.name == "Narrator" and record.backend == "qwen3-0.6b"
    assert record.reference_key == f"voices/custom/{ACCOUNT}/{record.voice_id}.wav"
    assert record.quality and record.quality["grade"] in ("good", "fair", "poor")
    original = record.metadata["original"]
    assert (original["sample_rate"], original["channels"]) == (44100, 2)
    stored = parse_wav(world.storage.objects[record.reference_key])
    assert (stored.sample_rate, stored.channels, stored.bits_per_sample) == (24000, 1, 16)
    [registered] = world.bus.events(VoiceRegistered)
    assert registered.voice_id == record.voice_id and registered.account_id == ACCOUNT
    assert registered.reference_url == f"https://blobs.test/{record.reference_key}"
    assert registered.ref_text == "Words of the reference."
    # Routed to the profile queue of the voice's own backend only.
    assert world.bus.routing_keys[-1] == f"voice.registered.v1.{record.backend}"


async def test_a_reference_may_come_from_an_earlier_upload(world: World, reference: bytes) -> None:
    world.storage.uploads[(ACCOUNT, "up-1")] = ("voice_clone", reference)
    record = await world.register(None, upload_id="up-1")
    assert record.metadata["upload_id"] == "up-1" and record.metadata["upload_purpose"] == "voice_clone"
    assert record.reference_key in world.storage.objects
    # The voice claims the upload, so storage keeps it (an unclaimed voice_clone upload expires).
    assert world.storage.claimed == {"up-1": record.voice_id}


async def test_an_account_at_its_voice_cap_is_refused_409_before_any_work(world: World, reference: bytes) -> None:
    world.settings = VoicesSettings(max_voices_per_account=2)
    await world.register(reference)
    await world.register(reference)
    stored_before = dict(world.storage.objects)
    with pytest.raises(RpcError) as refused:
        await world.register(reference)
    assert (refused.value.status, refused.value.code) == (409, "voice_limit_reached")
    assert len(world.repo.rows) == 2 and world.storage.objects == stored_before
    await world.register(reference, account=OTHER)  # each account has its own cap


async def test_another_accounts_upload_cannot_be_used(world: World, reference: bytes) -> None:
    world.storage.uploads[(OTHER, "up-1")] = ("voice_clone", reference)
    with pytest.raises(RemoteError) as caught:
        await world.register(None, upload_id="up-1")
    assert caught.value.code == "upload_not_found" and world.repo.rows == {}


@pytest.mark.parametrize(("fields", "code", "status"), [
    ({"name": ""}, "missing_field", 400),
    ({"name": "   "}, "missing_field", 400),
    ({"name": "x" * 201}, "invalid_name", 422),
    ({"backend": "tacotron"}, "invalid_backend", 422),
    ({"lang": "xx"}, "unsupported_language", 422),
    ({"ref_text": "w" * 2001}, "invalid_ref_text", 422),
    ({"family": "f" * 201}, "invalid_family", 422),
    ({"upload_id": "up-1"}, "conflicting_fields", 400),
])
async def test_invalid_fields_are_refused_with_their_code(
        world: World, reference: bytes, fields: dict[str, Any], code: str, status: int) -> None:
    world.storage.uploads[(ACCOUNT, "up-1")] = ("voice_clone", reference)
    with pytest.raises(RpcError) as caught:
        await world.register(reference, **fields)
    assert (caught.value.code, caught.value.status) == (code, status)
    assert world.repo.rows == {} and world.storage.objects == {} and world.bus.published == []


async def test_no_audio_at_all_is_a_missing_field(world: World) -> None:
    with pytest.raises(RpcError) as caught:
        await world.register(None)
    assert (caught.value.code, caught.value.status) == ("missing_field", 400)


@pytest.mark.parametrize(("make", "code"), [
    (lambda: b"this is not audio at all", "not_wav"),
    (lambda: wavs.valid_wav(2.0), "duration_out_of_range"),
    (lambda: wavs.valid_wav(61.0, sample_rate=8000), "duration_out_of_range"),
    (lambda: wavs.valid_wav(8.0)[:30], "truncated"),
])
async def test_a_bad_wav_is_422_with_the_audio_error_code(world: World, make: Any, code: str) -> None:
    with pytest.raises(RpcError) as caught:
        await world.register(make())
    assert (caught.value.code, caught.value.status) == (code, 422)
    assert world.repo.rows == {} and world.storage.objects == {}


# Listing, reading, deleting ---------------------------------------------------------------------------

async def test_system_voices_are_listed_first_then_the_accounts_own(world: World, reference: bytes) -> None:
    first = await world.register(reference, name="First")
    second = await world.register(reference, name="Second")
    await world.register(reference, name="Not mine", account=OTHER)

    listed = await handlers.list_voices(ListVoices(account_id=ACCOUNT), envelope=ENV, repo=world.repo)

    ids = [v.voice_id for v in listed.voices]
    assert ids == [*(v.voice_id for v in SYSTEM_VOICES), first.voice_id, second.voice_id]
    assert [v.kind for v in listed.voices] == ["system"] * len(SYSTEM_VOICES) + ["custom", "custom"]


async def test_an_account_with_no_voices_still_sees_the_system_voices(world: World) -> None:
    listed = await handlers.list_voices(ListVoices(account_id="fresh"), envelope=ENV, repo=world.repo)
    assert [v.system_voice for v in listed.voices] == [v.name for v in SYSTEM_VOICES]


async def test_a_system_voice_is_readable_by_anyone_and_deletable_by_no_one(world: World) -> None:
    joe = SYSTEM_VOICES[0]
    record = await world.get(joe.voice_id, account="anyone")
    assert record.kind == "system" and record.system_voice == joe.name and record.backend == "embedded"
    with pytest.raises(RpcError) as caught:
        await world.delete(joe.voice_id)
    assert (caught.value.code, caught.value.status) == ("system_voice_readonly", 403)
    assert world.bus.events(VoiceDeleted) == []


async def test_another_accounts_voice_is_not_found(world: World, reference: bytes) -> None:
    theirs = await world.register(reference, account=OTHER)
    with pytest.raises(NotFound) as caught:
        await world.get(theirs.voice_id)
    assert caught.value.code == "voice_not_found"
    with pytest.raises(NotFound):
        await world.delete(theirs.voice_id)
    assert theirs.voice_id in world.repo.rows and world.bus.events(VoiceDeleted) == []


@pytest.mark.parametrize("voice_id", ["not-a-uuid", "", "'; DROP TABLE voices; --", str(uuid.uuid4())])
async def test_a_malformed_or_unknown_voice_id_is_not_found(world: World, voice_id: str) -> None:
    with pytest.raises(NotFound):
        await world.get(voice_id)
    with pytest.raises(NotFound):
        await world.delete(voice_id)


async def test_deleting_a_voice_forgets_it_and_announces_its_reference(world: World,
                                                                        reference: bytes) -> None:
    record = await world.register(reference)
    await world.delete(record.voice_id)
    assert world.repo.rows == {}
    [deleted] = world.bus.events(VoiceDeleted)
    assert (deleted.voice_id, deleted.account_id, deleted.reference_key) == (record.voice_id, ACCOUNT,
                                                                             record.reference_key)
    with pytest.raises(NotFound):
        await world.delete(record.voice_id)  # a second delete is a 404, not a second announcement
    assert len(world.bus.events(VoiceDeleted)) == 1


# Events -------------------------------------------------------------------------------------------------

async def test_voice_profiled_merges_one_profile_per_backend(world: World, reference: bytes) -> None:
    record = await world.register(reference)

    async def profiled(backend: str, profile: dict[str, Any]) -> None:
        event = VoiceProfiled(voice_id=record.voice_id, account_id=ACCOUNT, backend=backend, profile=profile)
        await handlers.on_voice_profiled(event, envelope=envelope(), repo=world.repo)

    await profiled("embedded", {"nearest": "joe", "similarity": 0.61})
    await profiled("qwen3-0.6b", {"x_vector": [0.1, 0.2]})
    # A newer profile replaces only its own backend's.
    await profiled("embedded", {"nearest": "heart", "similarity": 0.7})

    assert (await world.get(record.voice_id)).profile == {"embedded": {"nearest": "heart", "similarity": 0.7},
                                                          "qwen3-0.6b": {"x_vector": [0.1, 0.2]}}


async def test_a_profile_for_a_voice_deleted_meanwhile_is_dropped_quietly(world: World) -> None:
    event = VoiceProfiled(voice_id=str(uuid.uuid4()), account_id=ACCOUNT, backend="embedded",
                          profile={"a": 1})
    await handlers.on_voice_profiled(event, envelope=ENV, repo=world.repo)
    assert world.repo.rows == {}


async def test_an_account_purge_deletes_only_its_voices_and_confirms(world: World, reference: bytes) -> None:
    await world.register(reference)
    await world.register(reference)
    theirs = await world.register(reference, account=OTHER)

    await handlers.on_account_purge(AccountPurgeRequested(account_id=ACCOUNT, purge_id="p-1"), envelope=ENV,
                                    repo=world.repo, bus=world.bus)

    assert list(world.repo.rows) == [theirs.voice_id]
    [purged] = world.bus.events(AccountPurged)
    assert (purged.account_id, purged.purge_id, purged.service) == (ACCOUNT, "p-1", "voices")
    assert purged.removed == 2


async def test_a_voice_whose_row_cannot_be_written_releases_its_stored_reference(world: World, reference: bytes):
    async def broken_add(**_: Any) -> dict[str, Any]:
        raise ConnectionError("database gone")

    world.repo.add = broken_add  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await world.register(reference)
    [released] = world.bus.events(ObjectsReleased)
    assert released.account_id == ACCOUNT and len(released.keys) == 1
    assert released.keys[0].startswith(f"voices/custom/{ACCOUNT}/")
    assert world.bus.events(VoiceRegistered) == []


async def test_deletion_is_announced_before_the_row_goes_so_a_failed_delete_can_be_retried(
        world: World, reference: bytes):
    record = await world.register(reference)
    real_delete = world.repo.delete

    async def broken_delete(account_id: str, voice_id: str) -> None:
        raise ConnectionError("database gone")

    world.repo.delete = broken_delete  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await world.delete(record.voice_id)
    assert [e.voice_id for e in world.bus.events(VoiceDeleted)] == [record.voice_id]
    world.repo.delete = real_delete  # type: ignore[method-assign]
    await world.delete(record.voice_id)  # the retry finds the voice, announces again, and deletes it
    assert [e.voice_id for e in world.bus.events(VoiceDeleted)] == [record.voice_id] * 2
    assert record.voice_id not in world.repo.rows


@pytest.mark.parametrize("field", ["name", "ref_text", "family"])
async def test_text_that_cannot_be_stored_is_refused(world: World, reference: bytes, field: str):
    with pytest.raises(Invalid) as caught:
        await world.register(reference, **{field: "bad\x00text"})
    assert caught.value.code == "invalid_field" and world.repo.rows == {}


async def test_custom_voices_come_in_pages_with_a_cursor(world: World, reference: bytes):
    made = [(await world.register(reference, name=f"v{i}")).voice_id for i in range(5)]
    first = await handlers.list_voices(ListVoices(account_id=ACCOUNT, limit=2), envelope=ENV, repo=world.repo)
    system = [v.voice_id for v in first.voices if v.kind == "system"]
    assert len(system) == len(SYSTEM_VOICES)
    seen = [v.voice_id for v in first.voices if v.kind == "custom"]
    after = first.next_after
    while after is not None:
        page = await handlers.list_voices(ListVoices(account_id=ACCOUNT, limit=2, after=after), envelope=ENV,
                                          repo=world.repo)
        assert all(v.kind == "custom" for v in page.voices)  # system voices lead the first page only
        seen += [v.voice_id for v in page.voices]
        after = page.next_after
    assert seen == made
    with pytest.raises(Invalid) as caught:
        await handlers.list_voices(ListVoices(account_id=ACCOUNT, after="nope"), envelope=ENV, repo=world.repo)
    assert caught.value.code == "invalid_cursor"
