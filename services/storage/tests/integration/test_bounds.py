"""What storage keeps per account: renditions encoded once per job, caps on uploads and voices, and
voice_clone uploads that expire unless a voice claims them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from timbre_common.audio import encode_wav
from timbre_storage import handlers
from timbre_storage.adapters.blob import BlobStore
from timbre_storage.adapters.repository import ObjectRepository
from timbre_storage.domain import AccountLimits, ObjectMissing, QuotaExceeded

JOB = "6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5"
CREATED = datetime(2026, 5, 1, 11, 59, 58, tzinfo=UTC)


def _wav(seconds: float = 1.0) -> bytes:
    t = np.arange(int(24000 * seconds), dtype=np.float32) / 24000
    return encode_wav((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000)


async def _generation(repo: ObjectRepository, store: BlobStore, account: str = "acc1") -> str:
    obj = await handlers.store_generated_audio(job_id=JOB, account_id=account, created_at=CREATED, wav=_wav(),
                                               repo=repo, store=store)
    return obj.key


async def test_a_format_is_encoded_once_and_then_read_back(repo: ObjectRepository, store: BlobStore,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    key = await _generation(repo, store)
    encodes: list[str] = []
    real = handlers.transcode

    def counting(wav: bytes, fmt: str) -> tuple[bytes, str]:
        encodes.append(fmt)
        return real(wav, fmt)

    monkeypatch.setattr(handlers, "transcode", counting)
    first, body = await handlers.get_rendition(account_id="acc1", key=key, fmt="opus", repo=repo, store=store)
    again, body_again = await handlers.get_rendition(account_id="acc1", key=key, fmt="opus", repo=repo, store=store)
    assert encodes == ["opus"] and body_again == body and body[:4] == b"OggS"
    assert first.content_type == again.content_type == "audio/ogg; codecs=opus"
    source = await repo.get(key)
    assert source is not None and again.expires_at == source.expires_at and again.key.endswith(".opus")
    # WAV is the source itself; another account gets nothing.
    wav, wav_body = await handlers.get_rendition(account_id="acc1", key=key, fmt="wav", repo=repo, store=store)
    assert wav.key == key and wav_body == _wav()
    with pytest.raises(ObjectMissing):
        await handlers.get_rendition(account_id="acc2", key=key, fmt="mp3", repo=repo, store=store)


async def test_renditions_go_with_their_source(repo: ObjectRepository, store: BlobStore) -> None:
    key = await _generation(repo, store)
    rendition, _ = await handlers.get_rendition(account_id="acc1", key=key, fmt="mp3", repo=repo, store=store)
    await handlers.delete_objects(keys=[key], account_id="acc1", repo=repo, store=store)
    assert await repo.get(rendition.key) is None and not await store.exists(rendition.key)
    # Expiry: the sweeper takes both, as they share the source's expiry.
    key = await _generation(repo, store)
    rendition, _ = await handlers.get_rendition(account_id="acc1", key=key, fmt="flac", repo=repo, store=store)
    assert rendition.expires_at is not None
    gone = await handlers.sweep_expired(now=rendition.expires_at + timedelta(seconds=1), repo=repo, store=store)
    assert {o.key for o in gone} == {key, rendition.key}
    # And the account purge.
    key = await _generation(repo, store)
    rendition, _ = await handlers.get_rendition(account_id="acc1", key=key, fmt="pcm", repo=repo, store=store)
    await handlers.purge_account(account_id="acc1", repo=repo, store=store)
    assert not await store.exists(rendition.key) and await repo.keys_of_account("acc1") == []


async def test_an_account_past_its_upload_count_is_refused_409(repo: ObjectRepository, store: BlobStore) -> None:
    limits = AccountLimits(max_uploads=2, max_bytes=10_000)
    for n in range(2):
        await handlers.store_upload(account_id="acc1", upload_id=f"u{n}", purpose="stt_input", data=b"x" * 10,
                                    content_type="audio/wav", repo=repo, store=store, limits=limits)
    with pytest.raises(QuotaExceeded) as refused:
        await handlers.store_upload(account_id="acc1", upload_id="u9", purpose="stt_input", data=b"x",
                                    content_type="audio/wav", repo=repo, store=store, limits=limits)
    assert (refused.value.status, refused.value.code) == (409, "upload_limit_reached")
    assert await repo.get_upload("u9") is None
    # A redelivered upload is not a new one; another account has its own count.
    await handlers.store_upload(account_id="acc1", upload_id="u1", purpose="stt_input", data=b"x" * 10,
                                content_type="audio/wav", repo=repo, store=store, limits=limits)
    await handlers.store_upload(account_id="acc2", upload_id="v0", purpose="stt_input", data=b"x",
                                content_type="audio/wav", repo=repo, store=store, limits=limits)


async def test_uploads_and_voices_share_a_byte_cap_refused_413(repo: ObjectRepository, store: BlobStore) -> None:
    limits = AccountLimits(max_uploads=100, max_bytes=1000)
    await handlers.store_upload(account_id="acc1", upload_id="u1", purpose="voice_clone", data=b"x" * 600,
                                content_type="audio/wav", repo=repo, store=store, limits=limits)
    with pytest.raises(QuotaExceeded) as refused:
        await handlers.store_voice_reference(account_id="acc1", voice_id="v1", wav=b"y" * 500, repo=repo,
                                             store=store, limits=limits)
    assert (refused.value.status, refused.value.code) == (413, "storage_quota_exceeded")
    assert not await store.exists("voices/custom/acc1/v1.wav")
    with pytest.raises(QuotaExceeded):
        await handlers.store_upload(account_id="acc1", upload_id="u2", purpose="stt_input", data=b"z" * 401,
                                    content_type="audio/wav", repo=repo, store=store, limits=limits)
    await handlers.store_voice_reference(account_id="acc1", voice_id="v1", wav=b"y" * 400, repo=repo,
                                         store=store, limits=limits)


async def test_a_voice_clone_upload_expires_unless_a_voice_claims_it(repo: ObjectRepository,
                                                                     store: BlobStore) -> None:
    limits = AccountLimits(voice_clone_ttl=timedelta(hours=24))
    now = datetime.now(UTC)
    kept = await handlers.store_upload(account_id="acc1", upload_id="u1", purpose="voice_clone", data=b"W",
                                       content_type="audio/wav", repo=repo, store=store, limits=limits, now=now)
    unused = await handlers.store_upload(account_id="acc1", upload_id="u2", purpose="voice_clone", data=b"W",
                                         content_type="audio/wav", repo=repo, store=store, limits=limits, now=now)
    assert kept.expires_at == unused.expires_at == now + timedelta(hours=24)
    await handlers.store_voice_reference(account_id="acc1", voice_id="v1", wav=b"R", repo=repo, store=store,
                                         limits=limits, upload_id="u1")
    gone = await handlers.sweep_expired(now=now + timedelta(hours=25), repo=repo, store=store)
    assert [o.key for o in gone] == [unused.key]
    claimed = await repo.get(kept.key)
    assert claimed is not None and claimed.expires_at is None
    # The claimed upload goes with its voice.
    await handlers.delete_voice_objects(account_id="acc1", reference_key="voices/custom/acc1/v1.wav",
                                        voice_id="v1", repo=repo, store=store)
    assert await repo.get(kept.key) is None and not await store.exists(kept.key)
    assert await repo.keys_of_account("acc1") == []
