"""Unit tests for timbre_common.audio: the strict WAV parser, decoding, quality and output helpers."""

from __future__ import annotations

import io
import json
import struct
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timbre_common.audio import (
    RESPONSE_FORMATS,
    AudioError,
    QualityReport,
    WavInfo,
    crossfade_join,
    decode_wav,
    encode_wav,
    join_chunks,
    normalise_reference,
    parse_wav,
    quality_report,
    resample,
    to_mono,
    transcode,
    validate_reference,
)
from timbre_common.testing import load_module

hw = load_module("hostile_wavs", Path(__file__).resolve().parents[1] / "hostile_wavs.py")


@cache
def _corpus() -> dict[str, hw.HostileWav]:
    return {entry.name: entry for entry in hw.hostile_wavs()}


ALL_NAMES = list(_corpus())
REJECTED = [name for name, entry in _corpus().items() if entry.expected_code is not None]
ACCEPTED = [name for name, entry in _corpus().items() if entry.expected_code is None]
POOR = {
    "silence_10s": "mostly_silence",
    "very_quiet_10s": "too_quiet",
    "clipped_10s": "clipping",
    "white_noise_10s": "noisy",
}
CODES = {
    "not_wav", "unsupported_format", "malformed_wav", "truncated", "empty_audio", "invalid_samples",
    "duration_out_of_range", "too_large",
}


# ---------------------------------------------------------------------------------------------------------
# The hostile corpus


def test_corpus_is_big_and_every_entry_says_why() -> None:
    corpus = hw.hostile_wavs()
    assert len(corpus) >= 45
    assert len({entry.name for entry in corpus}) == len(corpus)
    for entry in corpus:
        assert isinstance(entry.data, bytes)
        assert entry.reason.strip()
        assert entry.expected_code is None or entry.expected_code in CODES


@pytest.mark.parametrize("name", REJECTED)
def test_hostile_file_is_rejected_with_its_code(name: str) -> None:
    entry = _corpus()[name]
    with pytest.raises(AudioError) as caught:
        validate_reference(entry.data)
    assert caught.value.code == entry.expected_code, caught.value.message
    assert caught.value.message


@pytest.mark.parametrize("name", ALL_NAMES)
def test_only_audio_error_escapes_any_entry_point(name: str) -> None:
    data = _corpus()[name].data
    for call in (parse_wav, decode_wav, quality_report, normalise_reference):
        try:
            call(data)
        except AudioError as exc:
            assert exc.code in CODES


@pytest.mark.parametrize("name", sorted(POOR))
def test_valid_but_poor_file_is_accepted_and_flagged(name: str) -> None:
    data = _corpus()[name].data
    validate_reference(data)
    report = quality_report(data)
    assert POOR[name] in report.issues
    assert report.grade == "poor"


@pytest.mark.parametrize("name", [n for n in ACCEPTED if n not in POOR])
def test_tolerated_writer_quirk_decodes_to_the_clean_signal(name: str) -> None:
    data = _corpus()[name].data
    info = validate_reference(data)
    samples, sr = decode_wav(data)
    expected, _ = decode_wav(hw.valid_wav(6.0))
    assert (sr, info.frames) == (24000, 144000)
    np.testing.assert_array_equal(samples, expected)
    assert quality_report(data).grade == "good"


def test_silence_report_has_floor_levels() -> None:
    report = quality_report(_corpus()["silence_10s"].data)
    assert report.rms_dbfs == report.peak_dbfs == -120.0
    assert report.silence_ratio == 1.0


# ---------------------------------------------------------------------------------------------------------
# Fuzzing: nothing but AudioError may escape


def _assert_only_audio_error(data: bytes) -> None:
    for call in (parse_wav, decode_wav, validate_reference):
        try:
            call(data)
        except AudioError as exc:
            assert exc.code in CODES
            # The catch-all safety net must never be what handled it: that would hide a parser bug.
            assert not exc.message.startswith(("unparseable", "undecodable")), exc.message
    try:
        validate_reference(data, min_s=0.0, max_s=1e9)
    except AudioError:
        pass


_SMALL_WAVS = [
    hw.valid_wav(0.02, 8000, bits=8),
    hw.valid_wav(0.02, 16000, channels=2, bits=24),
    hw.valid_wav(0.02, 8000, bits=32, fmt="float", extensible=True),
    hw.wav_bytes(np.zeros(40), 8000, extra_chunks=hw.chunk(b"LIST", b"INFOabc")),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_audio_error(data: bytes) -> None:
    _assert_only_audio_error(data)
    _assert_only_audio_error(b"RIFF" + data)
    _assert_only_audio_error(b"RIFF\xff\xff\xff\xffWAVE" + data)


@st.composite
def _mutated_wav(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SMALL_WAVS)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "u32", "u16", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif action in ("u32", "u16"):
            width = 4 if action == "u32" else 2
            # Header fields live in the first 80 bytes: hit them far more often than samples.
            pos = draw(st.integers(0, min(80, max(0, len(data) - width))))
            value = draw(st.sampled_from([0, 1, 2, 3, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFE, 8000]))
            data[pos : pos + width] = (value & (2 ** (8 * width) - 1)).to_bytes(width, "little")
        elif action == "truncate":
            del data[pos:]
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_wav())
def test_mutated_wavs_only_raise_audio_error(data: bytes) -> None:
    _assert_only_audio_error(data)


@pytest.mark.parametrize("bad_input", [None, 123, "RIFF....WAVE", [1, 2, 3]])
def test_non_bytes_input_is_an_audio_error(bad_input: object) -> None:
    for call in (parse_wav, decode_wav, validate_reference):
        with pytest.raises(AudioError):
            call(bad_input)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Accepted formats decode to the right values


def _pcm_header(tag: int, channels: int, rate: int, bits: int, payload: bytes) -> bytes:
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    return hw.riff(hw.chunk(b"fmt ", fmt) + hw.chunk(b"data", payload))


@pytest.mark.parametrize(
    ("bits", "payload", "expected"),
    [
        (8, bytes([0, 128, 255, 64]), [-1.0, 0.0, 127 / 128, -0.5]),
        (16, struct.pack("<4h", -32768, 0, 32767, 16384), [-1.0, 0.0, 32767 / 32768, 0.5]),
        (
            24,
            b"".join(v.to_bytes(3, "little", signed=True) for v in (-8388608, 1, 8388607, -4194304)),
            [-1.0, 1 / 8388608, 8388607 / 8388608, -0.5],
        ),
        (32, struct.pack("<4i", -(2**31), 0, 2**31 - 1, 2**30), [-1.0, 0.0, 1.0, 0.5]),
    ],
)
def test_pcm_extremes_decode_exactly(bits: int, payload: bytes, expected: list[float]) -> None:
    samples, sr = decode_wav(_pcm_header(1, 1, 8000, bits, payload))
    assert sr == 8000
    assert samples.dtype == np.float32 and samples.shape == (4, 1)
    np.testing.assert_allclose(samples[:, 0], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits", [32, 64])
def test_float_samples_decode_and_out_of_range_values_clip(bits: int) -> None:
    values = np.array([0.25, -0.5, 1.5, -3.0], dtype="<f4" if bits == 32 else "<f8")
    samples, _ = decode_wav(_pcm_header(3, 1, 16000, bits, values.tobytes()))
    np.testing.assert_allclose(samples[:, 0], [0.25, -0.5, 1.0, -1.0])


@pytest.mark.parametrize(
    ("subtype", "bits", "container"),
    [
        ("PCM_U8", 8, "WAV"),
        ("PCM_16", 16, "WAV"),
        ("PCM_24", 24, "WAV"),
        ("PCM_32", 32, "WAV"),
        ("FLOAT", 32, "WAV"),
        ("DOUBLE", 64, "WAV"),
        ("PCM_16", 16, "WAVEX"),
        ("PCM_24", 24, "WAVEX"),
        ("FLOAT", 32, "WAVEX"),
    ],
)
@pytest.mark.parametrize("channels", [1, 2])
def test_decode_matches_libsndfile(subtype: str, bits: int, container: str, channels: int) -> None:
    rng = np.random.default_rng(bits + channels)
    original = rng.uniform(-0.9, 0.9, size=(2000, channels))
    buffer = io.BytesIO()
    sf.write(buffer, original, 22050, format=container, subtype=subtype)
    data = buffer.getvalue()

    info = parse_wav(data)
    samples, sr = decode_wav(data)
    reference, ref_sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    assert (info.bits_per_sample, info.channels, info.frames, sr) == (bits, channels, 2000, ref_sr)
    assert info.format == ("float" if subtype in ("FLOAT", "DOUBLE") else "pcm")
    np.testing.assert_allclose(samples, reference, atol=1e-6)


@pytest.mark.parametrize("sample_rate", [8000, 11025, 16000, 22050, 24000, 44100, 48000, 96000, 192000])
def test_every_supported_sample_rate_is_accepted(sample_rate: int) -> None:
    info = parse_wav(hw.valid_wav(0.1, sample_rate))
    assert info.sample_rate == sample_rate
    assert info.frames == round(0.1 * sample_rate)
    assert info.duration_s == pytest.approx(0.1, abs=1 / sample_rate)


def test_eight_channels_accepted_and_mixed_to_mono() -> None:
    data = hw.wav_bytes(np.tile(np.linspace(-0.5, 0.5, 100)[:, None], (1, 8)), 16000, bits=24)
    samples, _ = decode_wav(data)
    assert samples.shape == (100, 8)
    np.testing.assert_allclose(to_mono(samples), np.linspace(-0.5, 0.5, 100), atol=1e-6)


def test_wav_info_reports_layout() -> None:
    data = hw.valid_wav(6.0, 24000, channels=2, bits=24)
    info = validate_reference(data)
    assert info == WavInfo("pcm", 2, 24000, 24, 144000, 44, 144000 * 6)
    assert info.duration_s == 6.0
    assert data[info.data_offset - 8 : info.data_offset - 4] == b"data"


def test_chunks_after_data_are_ignored() -> None:
    data = hw.valid_wav(0.1) + hw.chunk(b"LIST", b"INFO" * 10)
    data = data[:4] + struct.pack("<I", len(data) - 8) + data[8:]
    assert parse_wav(data).frames == 2400


def test_data_size_larger_than_file_is_clamped_to_whole_frames() -> None:
    data = hw.riff(hw.fmt_chunk(channels=2) + hw.chunk(b"data", bytes(4 * 300), size=10_000_000))
    info = parse_wav(data)
    assert (info.frames, info.data_size) == (300, 1200)


# ---------------------------------------------------------------------------------------------------------
# Reference validation and normalisation


def test_validate_reference_limits_are_configurable() -> None:
    data = hw.valid_wav(2.0)
    assert validate_reference(data, min_s=1.0, max_s=3.0).frames == 48000
    with pytest.raises(AudioError) as caught:
        validate_reference(data, max_bytes=1000)
    assert caught.value.code == "too_large"


@pytest.mark.parametrize("seconds", [5.0, 60.0])
def test_duration_bounds_are_inclusive(seconds: float) -> None:
    assert validate_reference(hw.valid_wav(seconds, 8000)).duration_s == seconds


def test_normalise_reference_gives_mono_24k_peak_near_minus_1_dbfs() -> None:
    quiet_stereo = hw.valid_wav(6.0, 44100, channels=2, bits=24)
    samples, _ = decode_wav(quiet_stereo)
    attenuated = hw.wav_bytes(samples * 0.05, 44100, bits=24)

    out = normalise_reference(attenuated)
    info = parse_wav(out)
    assert (info.format, info.channels, info.sample_rate, info.bits_per_sample) == ("pcm", 1, 24000, 16)
    assert info.duration_s == pytest.approx(6.0, abs=0.01)
    normalised, _ = decode_wav(out)
    assert 20 * np.log10(np.max(np.abs(normalised))) == pytest.approx(-1.0, abs=0.1)


def test_normalise_reference_leaves_silence_silent() -> None:
    out = normalise_reference(_corpus()["silence_10s"].data, target_sr=16000)
    samples, sr = decode_wav(out)
    assert sr == 16000 and not np.any(samples)


def test_normalise_reference_rejects_what_the_parser_rejects() -> None:
    with pytest.raises(AudioError):
        normalise_reference(_corpus()["mu_law"].data)


# ---------------------------------------------------------------------------------------------------------
# Quality report


def test_clean_speech_grades_good_and_serialises() -> None:
    report = quality_report(hw.valid_wav(8.0, 48000, channels=2))
    assert isinstance(report, QualityReport)
    assert report.grade == "good" and report.issues == ()
    assert report.snr_db > 30 and -30 < report.rms_dbfs < -6 and report.clipping_ratio == 0.0
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["issues"] == [] and as_dict["channels"] == 2 and as_dict["sample_rate"] == 48000


def test_low_sample_rate_is_an_issue_but_not_poor() -> None:
    report = quality_report(hw.valid_wav(6.0, 8000))
    assert report.issues == ("low_sample_rate",)
    assert report.grade == "fair"


def test_speech_with_noise_floor_is_noisy() -> None:
    samples, sr = decode_wav(hw.valid_wav(6.0))
    noisy = samples[:, 0] + np.random.default_rng(3).normal(0, 0.05, samples.shape[0])
    report = quality_report(hw.wav_bytes(noisy, sr))
    assert "noisy" in report.issues
    assert report.snr_db < 15


# ---------------------------------------------------------------------------------------------------------
# Resampling, mono, encoding


def _dominant_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * sr / x.size)


@pytest.mark.parametrize(
    ("sr_from", "sr_to"), [(48000, 24000), (22050, 24000), (8000, 24000), (44100, 16000)]
)
def test_resample_keeps_pitch_length_and_level(sr_from: int, sr_to: int) -> None:
    t = np.arange(sr_from) / sr_from
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    out = resample(tone, sr_from, sr_to)
    assert out.dtype == np.float32
    assert abs(out.size - sr_to) <= 1
    assert _dominant_hz(out, sr_to) == pytest.approx(1000, abs=2)
    middle = out[sr_to // 10 : -sr_to // 10]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_resample_removes_content_above_new_nyquist() -> None:
    t = np.arange(48000) / 48000
    alias_bait = np.sin(2 * np.pi * 15000 * t).astype(np.float32)
    out = resample(alias_bait, 48000, 24000)
    assert np.sqrt(np.mean(out[2400:-2400] ** 2)) < 0.02


def test_numpy_fallback_matches_scipy_when_scipy_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    t = np.arange(22050) / 22050
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    with_scipy = resample(tone, 22050, 24000)
    monkeypatch.setitem(sys.modules, "scipy.signal", None)
    without_scipy = resample(tone, 22050, 24000)
    assert without_scipy.shape == with_scipy.shape
    middle = slice(1000, -1000)
    assert np.max(np.abs(without_scipy[middle] - with_scipy[middle])) < 0.01
    stereo = resample(np.stack([tone, tone], axis=1), 22050, 16000)
    assert stereo.shape == (16000, 2)


def test_resample_same_rate_is_a_copy() -> None:
    x = np.ones(10, dtype=np.float32)
    out = resample(x, 16000, 16000)
    out[0] = 0
    assert x[0] == 1


def test_to_mono_shapes() -> None:
    assert to_mono(np.array([[0.2, 0.4], [-1.0, 1.0]])).tolist() == pytest.approx([0.3, 0.0])
    assert to_mono(np.array([0.1, 0.2])).dtype == np.float32
    with pytest.raises(ValueError):
        to_mono(np.zeros((2, 2, 2)))


def test_encode_wav_round_trips_clips_and_scrubs_nan() -> None:
    samples = np.array([0.0, 0.5, -0.5, 2.0, -2.0, np.nan], dtype=np.float32)
    data = encode_wav(samples, 16000)
    info = parse_wav(data)
    assert (info.channels, info.bits_per_sample, info.sample_rate, info.frames) == (1, 16, 16000, 6)
    decoded, _ = decode_wav(data)
    np.testing.assert_allclose(decoded[:, 0], [0.0, 0.5, -0.5, 1.0, -1.0, 0.0], atol=1 / 32768)
    assert sf.info(io.BytesIO(data)).frames == 6


def test_encode_wav_rejects_a_bad_rate() -> None:
    with pytest.raises(ValueError):
        encode_wav(np.zeros(4), 0)


# ---------------------------------------------------------------------------------------------------------
# Joining synthesized chunks


def test_join_chunks_fades_every_edge_and_pauses_between() -> None:
    sr = 24000
    chunks = [np.full(4800, 0.8, dtype=np.float32), np.full((2400, 1), -0.8, dtype=np.float32)]
    joined = join_chunks(chunks, sr, pause_ms=120, fade_ms=10)
    pause = int(sr * 0.12)
    assert joined.shape == (4800 + pause + 2400,)
    assert joined[0] == pytest.approx(0) and joined[-1] == pytest.approx(0)
    assert joined[4799] == pytest.approx(0, abs=1e-6)
    assert not np.any(joined[4800 : 4800 + pause])
    # No click: the largest step is one step of a 10 ms raised-cosine ramp, far below a 0.8 jump.
    assert np.max(np.abs(np.diff(joined))) < 0.01


def test_join_chunks_crossfade_overlaps_without_pause_or_dip() -> None:
    sr = 24000
    a, b = np.full(4800, 0.5, dtype=np.float32), np.full(2400, 0.5, dtype=np.float32)
    joined = join_chunks([a, b], sr, crossfade_ms=30, fade_ms=10)
    overlap = int(sr * 0.03)
    assert joined.shape == (4800 + 2400 - overlap,)
    # A constant signal stays constant across the join: gains sum to one, no dip to silence, no pause.
    inner = joined[int(sr * 0.01) : -int(sr * 0.01)]
    assert np.allclose(inner, 0.5, atol=1e-6)
    assert joined[0] == pytest.approx(0) and joined[-1] == pytest.approx(0)


def test_crossfade_join_blends_the_overlap() -> None:
    a = np.ones(100, dtype=np.float32)
    b = -np.ones(300, dtype=np.float32)
    out = crossfade_join(a[-50:], b)
    assert out.shape == (300,)
    assert out[0] == pytest.approx(1.0) and out[49] == pytest.approx(-1.0) and out[-1] == -1.0
    assert np.max(np.abs(np.diff(out))) < 0.1  # a ramp, not a step from +1 to -1
    assert crossfade_join(np.zeros(0), b).shape == (300,)


def test_join_chunks_edge_cases() -> None:
    assert join_chunks([], 24000).size == 0
    assert join_chunks([np.zeros(0)], 24000).size == 0
    single = join_chunks([np.ones(3, dtype=np.float32)], 24000)
    assert single.size == 3 and single.dtype == np.float32


# ---------------------------------------------------------------------------------------------------------
# Transcoding


@pytest.mark.parametrize("source_rate", [24000, 22050, 44100])
@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac"])
def test_transcoded_audio_decodes_again(fmt: str, source_rate: int) -> None:
    wav = hw.valid_wav(1.0, source_rate)
    body, content_type = transcode(wav, fmt)
    assert content_type == RESPONSE_FORMATS[fmt]
    decoded, sr = sf.read(io.BytesIO(body), dtype="float32")
    assert decoded.ndim == 1
    if fmt == "opus":
        assert sr in (8000, 12000, 16000, 24000, 48000)
    if fmt == "flac":
        assert sr == source_rate
    assert decoded.size / sr == pytest.approx(1.0, abs=0.08)
    assert np.sqrt(np.mean(decoded**2)) > 0.05


def test_transcode_wav_is_passthrough_and_pcm_is_raw_little_endian() -> None:
    wav = hw.valid_wav(0.5, 16000)
    assert transcode(wav, "wav") == (wav, "audio/wav")
    body, content_type = transcode(wav, "pcm")
    assert content_type == "audio/pcm; rate=16000; channels=1; format=s16le"
    assert len(body) == 8000 * 2
    np.testing.assert_array_equal(np.frombuffer(body, "<i2"), np.frombuffer(wav[44:], "<i2"))


def test_transcode_rejects_unknown_format_and_bad_input() -> None:
    with pytest.raises(AudioError) as caught:
        transcode(hw.valid_wav(0.1), "aac")
    assert caught.value.code == "unsupported_format"
    with pytest.raises(AudioError):
        transcode(b"not a wav", "mp3")


def test_an_uploads_type_is_sniffed_from_its_bytes_not_taken_from_a_name() -> None:
    from timbre_common.audio import encode_wav, sniff_content_type

    assert sniff_content_type(encode_wav(np.zeros(10, dtype=np.float32), 24000)) == "audio/wav"
    assert sniff_content_type(b"fLaC\x00\x00\x00\x22") == "audio/flac"
    assert sniff_content_type(b"OggS\x00\x02" + bytes(20)) == "audio/ogg"
    assert sniff_content_type(b"ID3\x04\x00" + bytes(10)) == "audio/mpeg"
    assert sniff_content_type(b"\xff\xfb\x90\x00") == "audio/mpeg"
    assert sniff_content_type(b"\xff\xf1\x50\x80") == "audio/aac"
    assert sniff_content_type(b"\x00\x00\x00\x20ftypM4A ") == "audio/mp4"
    assert sniff_content_type(b"<html><script>") == "application/octet-stream"
    assert sniff_content_type(b"") == "application/octet-stream"
