"""The Python SDK against the running platform: voices, synthesis (cache hit, job with progress, streamed),
uploads, usage, keys, errors with their codes, account deletion; the async client too."""
from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest

from timbre import (
    AsyncTimbre,
    Audio,
    AuthenticationError,
    InvalidRequestError,
    Job,
    NotFoundError,
    Timbre,
)
from timbre_common.audio import parse_wav
from timbre_common.catalogue import SYSTEM_VOICES

from .conftest import ADMIN

pytestmark = pytest.mark.e2e
JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")


@pytest.fixture
def sdk(client) -> Timbre:  # type: ignore[no-untyped-def]
    with Timbre(client.new_key()["api_key"], base_url=client.base_url) as c:
        yield c


def test_voices_from_a_path_and_from_an_upload(sdk: Timbre, wavs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reference = tmp_path / "me.wav"
    reference.write_bytes(wavs.valid_wav(8.0))
    voice = sdk.voices.create(reference, name="sdk voice", text="A few words of mine.")
    assert voice.kind == "custom" and voice.name == "sdk voice" and voice.ref_text == "A few words of mine."
    listed = sdk.voices.list()
    assert {"joe", "heart", "sdk voice"} <= {v.name for v in listed}
    assert sdk.voices.find("sdk voice").voice_id == voice.voice_id
    assert sdk.voices.find(voice.voice_id).name == "sdk voice"
    assert sdk.voices.get(voice.voice_id).quality is not None

    upload = sdk.uploads.create(wavs.valid_wav(6.0), purpose="voice_clone")
    assert upload.purpose == "voice_clone" and upload.size > 0
    from_upload = sdk.voices.create(name="from upload", upload_id=upload.upload_id)
    assert from_upload.kind == "custom"

    sdk.voices.delete(voice.voice_id)
    with pytest.raises(NotFoundError) as gone:
        sdk.voices.get(voice.voice_id)
    assert gone.value.status == 404 and gone.value.code == "voice_not_found" and gone.value.request_id
    with pytest.raises(NotFoundError):
        sdk.voices.find("sdk voice")


def test_speech_job_with_progress_then_cache_hit(sdk: Timbre) -> None:
    text = f"The software development kit waits for this sentence {uuid.uuid4().hex[:8]}."
    job = sdk.speech.create(text, voice=JOE.voice_id)
    assert isinstance(job, Job) and job.status == "pending"
    seen: list[tuple[str, float]] = []
    done = sdk.jobs.wait(job.job_id, on_progress=lambda j, elapsed: seen.append((j.status, elapsed)))
    assert done.status == "ready" and done.audio_url and done.characters == len(text)
    assert seen[-1][0] == "ready" and [s for s, _ in seen[:-1]] == ["pending"] * (len(seen) - 1)
    assert [e for _, e in seen] == sorted(e for _, e in seen)
    audio = sdk.jobs.audio(job.job_id)
    assert audio.content_type == "audio/wav" and parse_wav(audio.content).duration_s > 1.0
    again = sdk.speech.create(text, voice=JOE.voice_id)
    assert isinstance(again, Audio) and again.cache == "HIT" and again.content == audio.content
    assert again.job_id == job.job_id


def test_a_retried_synthesis_creates_one_job(sdk: Timbre) -> None:
    text = f"Said once however often it is asked {uuid.uuid4().hex[:8]}."
    first = sdk.speech.create(text, voice=JOE.voice_id, idempotency_key="sdk-e2e-1")
    second = sdk.speech.create(text, voice=JOE.voice_id, idempotency_key="sdk-e2e-1")
    assert isinstance(first, Job) and isinstance(second, Job) and first.job_id == second.job_id
    with pytest.raises(InvalidRequestError) as reused:
        sdk.speech.create("Something else.", voice=JOE.voice_id, idempotency_key="sdk-e2e-1")
    assert reused.value.code == "idempotency_key_reused"


def test_streamed_synthesis_yields_the_whole_audio(sdk: Timbre) -> None:
    text = f"Streamed to the caller piece by piece {uuid.uuid4().hex[:8]}."
    progress: list[str] = []
    pieces = list(sdk.speech.stream(text, voice=JOE.voice_id, chunk_size=4096,
                                    on_progress=lambda j, _: progress.append(j.status)))
    audio = b"".join(pieces)
    assert len(pieces) > 1 and all(len(p) <= 4096 for p in pieces)
    assert parse_wav(audio).duration_s > 1.0
    # The stream ends with its last piece; the job is stored and cached a moment later. Then a stream of the same
    # text is the cache's, and its bytes are the same.
    deadline = time.monotonic() + 60
    while not isinstance(sdk.speech.create(text, voice=JOE.voice_id), Audio):
        assert time.monotonic() < deadline, "the streamed job never reached the cache"
        time.sleep(0.2)
    again = b"".join(sdk.speech.stream(text, voice=JOE.voice_id))
    # Cut from the stored WAV's decoded samples: the same audio, to within one step of 16-bit rounding.
    ours, theirs = np.frombuffer(again[44:], "<i2"), np.frombuffer(audio[44:], "<i2")
    assert again[:44] == audio[:44] and ours.shape == theirs.shape
    assert int(np.abs(ours.astype(np.int32) - theirs).max()) <= 1


def test_usage_counts_the_characters(sdk: Timbre) -> None:
    text = f"Counted towards this period {uuid.uuid4().hex[:8]}."
    sdk.speech.generate(text, voice=JOE.voice_id)
    deadline = time.monotonic() + 30
    while (report := sdk.usage.get()).characters_used < len(text) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert report.characters_used == len(text) and report.jobs == 1 and report.billing == "off"


def test_keys_as_admin_and_errors_carry_codes(client) -> None:  # type: ignore[no-untyped-def]
    admin = Timbre(admin_secret=ADMIN, base_url=client.base_url)
    created = admin.keys.create(label="sdk e2e")
    assert created.api_key.startswith("tb_")
    assert created.key_id in {k.key_id for k in admin.keys.list(account_id=created.account_id)}
    user = Timbre(created.api_key, base_url=client.base_url)
    assert user.usage.get().account_id == created.account_id
    admin.keys.revoke(created.key_id)
    with pytest.raises(AuthenticationError) as refused:
        user.usage.get()
    assert refused.value.code == "invalid_api_key" and refused.value.status == 401
    with pytest.raises(AuthenticationError) as not_admin:
        Timbre(admin_secret="wrong", base_url=client.base_url).keys.list()
    assert not_admin.value.code == "invalid_admin_secret"


def test_account_deletion_ends_the_key(sdk: Timbre) -> None:
    purge = sdk.account.delete()
    assert purge.status in ("completed", "pending") and purge.account_id
    with pytest.raises(AuthenticationError):
        sdk.voices.list()


def test_async_client(client) -> None:  # type: ignore[no-untyped-def]
    key = client.new_key()["api_key"]

    async def run() -> tuple[bytes, list[str], bytes]:
        async with AsyncTimbre(key, base_url=client.base_url) as sdk:
            assert (await sdk.health()).status == "ok"
            voice = await sdk.voices.find("joe")
            seen: list[str] = []

            async def on_progress(job: Job, _: float) -> None:
                seen.append(job.status)

            text = f"Asynchronous and still in time {uuid.uuid4().hex[:8]}."
            audio = await sdk.speech.generate(text, voice=voice.voice_id, on_progress=on_progress)
            streamed = b"".join([p async for p in sdk.speech.stream(text, voice=voice.voice_id)])
            return audio.content, seen, streamed

    content, seen, streamed = asyncio.run(run())
    # The stream's WAV header leaves its sizes open (it is written before the length is known), and the stored
    # audio is cut into pieces as decoded samples: the same samples, to within one step of 16-bit rounding.
    assert parse_wav(content).duration_s > 1.0 and seen[-1] == "ready"
    ours, theirs = np.frombuffer(streamed[44:], "<i2"), np.frombuffer(content[44:], "<i2")
    assert streamed[:4] == b"RIFF" and ours.shape == theirs.shape
    assert int(np.abs(ours.astype(np.int32) - theirs).max()) <= 1
