"""Key layout, id guards and retention classes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from timbre_storage.domain import (
    InvalidId,
    RetentionClass,
    UploadPurpose,
    account_prefixes,
    check_key,
    custom_voice_key,
    expires_at,
    ext_for_content_type,
    generation_key,
    system_voice_key,
    upload_key,
    voice_key,
)

ACCOUNT = "acc_123"
WHEN = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def test_voice_keys() -> None:
    assert system_voice_key("joe-us") == "voices/system/joe-us.wav"
    assert custom_voice_key(ACCOUNT, "v1") == "voices/custom/acc_123/v1.wav"
    assert voice_key(None, "v1") == "voices/system/v1.wav"
    assert voice_key(ACCOUNT, "v1") == "voices/custom/acc_123/v1.wav"


def test_generation_key_uses_job_creation_time_in_utc() -> None:
    job = "0d3c2b1a-1111-2222-3333-444455556666"
    assert generation_key(ACCOUNT, job, WHEN) == f"generations/acc_123/2026/03/04/050607-{job}.wav"
    local = WHEN.astimezone(timezone(timedelta(hours=-8)))  # same instant, other zone: same key
    assert generation_key(ACCOUNT, job, local) == generation_key(ACCOUNT, job, WHEN)
    with pytest.raises(ValueError):
        generation_key(ACCOUNT, job, WHEN.replace(tzinfo=None))


def test_upload_keys_by_purpose() -> None:
    assert upload_key(ACCOUNT, "u1", UploadPurpose.STT_INPUT, WHEN, "mp3") == (
        "uploads/acc_123/2026/03/04/050607-u1.mp3"
    )
    assert upload_key(ACCOUNT, "u1", UploadPurpose.VOICE_CLONE, WHEN, "wav") == (
        "voice-recordings/acc_123/2026/03/04/050607-u1.wav"
    )


@pytest.mark.parametrize(
    "bad", ["..", ".", "a/b", "../x", "a\\b", "", "-lead", "x" * 129, "a b", "a\x00", "ü", "a.b"]
)
def test_ids_that_could_escape_their_prefix_are_refused(bad: str) -> None:
    with pytest.raises(InvalidId):
        generation_key(ACCOUNT, bad, WHEN)
    with pytest.raises(InvalidId):
        custom_voice_key(bad, "v1")
    with pytest.raises(InvalidId):
        account_prefixes(bad)


@pytest.mark.parametrize("bad", ["wav/../x", "WAV", ".", "", "toolongext"])
def test_bad_extensions_refused(bad: str) -> None:
    with pytest.raises(InvalidId):
        generation_key(ACCOUNT, "j1", WHEN, bad)


@pytest.mark.parametrize(
    "bad", ["", "/abs", "a//b", "a/../b", "../a", "a/./b", "a/.hidden", "a/", "a\\..\\b", "a/b\x00"]
)
def test_check_key_refuses_traversal(bad: str) -> None:
    with pytest.raises(InvalidId):
        check_key(bad)


def test_check_key_accepts_generated_keys() -> None:
    assert check_key(generation_key(ACCOUNT, "j1", WHEN)) == "generations/acc_123/2026/03/04/050607-j1.wav"


def test_account_prefixes_name_the_account_and_end_with_slash() -> None:
    prefixes = account_prefixes(ACCOUNT)
    assert prefixes == [
        "voices/custom/acc_123/",
        "generations/acc_123/",
        "uploads/acc_123/",
        "voice-recordings/acc_123/",
    ]
    keys = [
        custom_voice_key(ACCOUNT, "v"),
        generation_key(ACCOUNT, "j", WHEN),
        upload_key(ACCOUNT, "u", UploadPurpose.UPLOAD, WHEN, "wav"),
        upload_key(ACCOUNT, "u", UploadPurpose.VOICE_CLONE, WHEN, "wav"),
    ]
    assert all(any(k.startswith(p) for p in prefixes) for k in keys)
    other = generation_key("acc_1234", "j", WHEN)  # a longer id sharing the prefix string
    assert not any(other.startswith(p) for p in prefixes)


@pytest.mark.parametrize(
    ("cls", "days"),
    [
        (RetentionClass.TTS_AUDIO, 7),
        (RetentionClass.UPLOAD, 30),
        (RetentionClass.STT_INPUT, 30),
        (RetentionClass.WATERMARK_INPUT, 30),
        (RetentionClass.AUDIO_JOB_INPUT, 30),
        (RetentionClass.VOICE_REFERENCE, None),
        (RetentionClass.BUILT_VOICE, None),
        (RetentionClass.VOICE_CLONE, 1),  # unless a voice claims it
    ],
)
def test_retention(cls: RetentionClass, days: int | None) -> None:
    expected = None if days is None else WHEN + timedelta(days=days)
    assert expires_at(cls, WHEN) == expected
    assert cls.permanent is (days is None)


def test_upload_purpose_maps_to_retention() -> None:
    assert UploadPurpose.VOICE_CLONE.retention is RetentionClass.VOICE_CLONE
    assert UploadPurpose.UPLOAD.retention is RetentionClass.UPLOAD
    assert {p.value for p in UploadPurpose} == {
        "upload", "stt_input", "watermark_input", "audio_job_input", "voice_clone"
    }


def test_ext_for_content_type() -> None:
    assert ext_for_content_type("audio/wav") == "wav"
    assert ext_for_content_type("audio/MPEG; charset=x") == "mp3"
    assert ext_for_content_type("application/x-evil/../") == "bin"


def test_the_extension_never_comes_from_the_clients_file_name() -> None:
    # The content type is what the gateway sniffed from the bytes; a file name cannot pick the extension.
    assert ext_for_content_type("application/octet-stream") == "bin"
    with pytest.raises(TypeError):
        ext_for_content_type("application/octet-stream", "take.html")  # type: ignore[call-arg]
