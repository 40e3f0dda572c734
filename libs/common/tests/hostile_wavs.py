"""A corpus of malformed and hostile WAV uploads, plus a generator of valid speech-like WAVs.

Load it by path from any test (it depends only on numpy):
``timbre_common.testing.load_module("hostile_wavs", path)``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["HostileWav", "hostile_wavs", "valid_wav", "wav_bytes", "fmt_chunk", "chunk", "riff"]

_SUBFORMAT_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


@dataclass(frozen=True)
class HostileWav:
    """One hostile upload: ``expected_code`` is the AudioError code, or None if it is accepted but poor."""

    name: str
    data: bytes
    reason: str
    expected_code: str | None = None


def chunk(chunk_id: bytes, body: bytes, *, size: int | None = None, pad: bool = True) -> bytes:
    """A RIFF chunk; ``size`` overrides the declared length, ``pad`` adds the even-length pad byte."""
    declared = len(body) if size is None else size
    padding = b"\x00" if pad and len(body) % 2 else b""
    return chunk_id + struct.pack("<I", declared & 0xFFFFFFFF) + body + padding


def fmt_chunk(
    *,
    tag: int = 1,
    channels: int = 1,
    sample_rate: int = 24000,
    bits: int = 16,
    block_align: int | None = None,
    byte_rate: int | None = None,
    extensible_subtag: int | None = None,
    subformat: bytes | None = None,
    valid_bits: int | None = None,
    cb_size: int = 22,
) -> bytes:
    """A fmt chunk; pass ``extensible_subtag`` (or ``subformat``) for WAVE_FORMAT_EXTENSIBLE."""
    align = channels * bits // 8 if block_align is None else block_align
    rate = sample_rate * align if byte_rate is None else byte_rate
    if extensible_subtag is None and subformat is None:
        body = struct.pack("<HHIIHH", tag, channels, sample_rate & 0xFFFFFFFF, rate & 0xFFFFFFFF, align, bits)
        return chunk(b"fmt ", body)
    guid = subformat if subformat is not None else struct.pack("<H", extensible_subtag) + _SUBFORMAT_TAIL
    body = struct.pack(
        "<HHIIHHHHI", 0xFFFE, channels, sample_rate, rate, align, bits, cb_size,
        bits if valid_bits is None else valid_bits, (1 << channels) - 1,
    ) + guid
    return chunk(b"fmt ", body)


def riff(
    body: bytes, *, riff_size: int | None = None, magic: bytes = b"RIFF", form: bytes = b"WAVE"
) -> bytes:
    """Wrap chunks in a RIFF header; ``riff_size`` overrides the declared size."""
    size = 4 + len(body) if riff_size is None else riff_size
    return magic + struct.pack("<I", size & 0xFFFFFFFF) + form + body


def _speech_like(seconds: float, sample_rate: int) -> np.ndarray:
    """A voiced, syllable-modulated harmonic signal with a faint noise floor, peak about 0.5."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    f0 = 140.0 + 20.0 * np.sin(2 * np.pi * 0.7 * t)  # slow intonation
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    nyquist = sample_rate / 2
    voiced = np.zeros(n)
    for k in range(1, 11):
        if 160.0 * k < nyquist:
            voiced += np.sin(k * phase) / k
    syllables = 0.5 - 0.5 * np.cos(2 * np.pi * 4.0 * t)
    words = (np.sin(2 * np.pi * 0.5 * t) > -0.6).astype(np.float64)  # a short pause every 2 s
    signal = voiced * syllables * words
    peak = np.max(np.abs(signal)) if n else 1.0
    signal = 0.5 * signal / (peak or 1.0)
    noise = np.random.default_rng(1234).normal(0.0, 10 ** (-70 / 20), n)
    return signal + noise


def _encode_samples(samples: np.ndarray, bits: int, fmt: str) -> bytes:
    """Interleaved little-endian sample bytes for a (frames, channels) float array in [-1, 1]."""
    x = np.clip(samples, -1.0, 1.0)
    if fmt == "float":
        return x.astype("<f4" if bits == 32 else "<f8").tobytes()
    if bits == 8:
        return np.round(x * 127.0 + 128.0).astype(np.uint8).tobytes()
    if bits == 16:
        return np.round(x * 32767.0).astype("<i2").tobytes()
    if bits == 24:
        ints = np.round(x * 8_388_607.0).astype("<i4")
        return ints.reshape(-1, 1).view(np.uint8)[:, :3].tobytes()
    if bits == 32:
        return np.round(x.astype(np.float64) * 2_147_483_647.0).astype("<i4").tobytes()
    raise ValueError(f"unsupported bits {bits}")


def wav_bytes(
    samples: np.ndarray,
    sample_rate: int,
    *,
    bits: int = 16,
    fmt: Literal["pcm", "float"] = "pcm",
    extensible: bool = False,
    extra_chunks: bytes = b"",
) -> bytes:
    """A WAV holding ``samples`` (1-D or (frames, channels)) in the requested sample format."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    channels = x.shape[1]
    tag = 3 if fmt == "float" else 1
    if extensible:
        fmt_part = fmt_chunk(channels=channels, sample_rate=sample_rate, bits=bits, extensible_subtag=tag)
    else:
        fmt_part = fmt_chunk(tag=tag, channels=channels, sample_rate=sample_rate, bits=bits)
    return riff(fmt_part + extra_chunks + chunk(b"data", _encode_samples(x, bits, fmt)))


def valid_wav(
    seconds: float,
    sample_rate: int = 24000,
    channels: int = 1,
    bits: int = 16,
    fmt: Literal["pcm", "float"] = "pcm",
    *,
    extensible: bool = False,
) -> bytes:
    """A well-formed WAV of a speech-like test signal (not silence) for other tests."""
    mono = _speech_like(seconds, sample_rate)
    # Slightly different channels, so a stereo file is not trivially mono.
    stacked = np.stack([mono * (1.0 - 0.1 * c) for c in range(channels)], axis=1)
    return wav_bytes(stacked, sample_rate, bits=bits, fmt=fmt, extensible=extensible)


def _pcm16(seconds: float, sample_rate: int = 24000) -> bytes:
    return _encode_samples(_speech_like(seconds, sample_rate)[:, None], 16, "pcm")


def hostile_wavs() -> list[HostileWav]:
    """Every hostile upload in the corpus (about 25 MB in total, most of it the oversize entry)."""
    fmt16 = fmt_chunk()
    data6 = _pcm16(6.0)
    good_body = fmt16 + chunk(b"data", data6)
    good = riff(good_body)
    list_chunk = chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00Lavf\x00\x00")

    def with_fmt(**kwargs: int) -> bytes:
        return riff(fmt_chunk(**kwargs) + chunk(b"data", data6))

    def ext(subformat: bytes | None = None, **kwargs: int) -> bytes:
        return riff(fmt_chunk(subformat=subformat, **kwargs) + chunk(b"data", data6))

    stereo_data = _encode_samples(np.stack([_speech_like(6.0, 24000)] * 2, axis=1), 16, "pcm")
    float_silence = np.zeros(24000 * 6, dtype="<f4")
    nan_samples = float_silence.copy()
    nan_samples[1000] = np.nan
    inf_samples = float_silence.copy()
    inf_samples[2000] = np.inf
    fmt_float = fmt_chunk(tag=3, bits=32)
    quiet = _speech_like(10.0, 24000) * 10 ** (-55 / 20) / 0.5
    clipped = np.clip(_speech_like(10.0, 24000) * 8.0, -1.0, 1.0)
    noise = np.random.default_rng(7).uniform(-0.3, 0.3, 24000 * 10)
    oversize_payload = 20 * 1024 * 1024 + 48000
    tiny_chunks = b"".join(chunk(b"junk", b"") for _ in range(5000))

    declared = 36 + len(data6)  # what the header of a complete 6 s file would claim
    streaming = chunk(b"data", data6 + b"\x01", size=0xFFFFFFFF, pad=False)
    short_ext_fmt = chunk(b"fmt ", fmt_chunk(extensible_subtag=1)[8:26])
    id3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" * 400
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", b"\x00" * 13)
    not_a_fourcc = b"\x00\xff\x00\xff\x04\x00\x00\x00abcd"
    D = chunk(b"data", data6)  # noqa: N806 - the samples most entries share, kept short for the table

    def entry(name: str, code: str | None, reason: str, data: bytes) -> HostileWav:
        return HostileWav(name=name, data=data, reason=reason, expected_code=code)

    return [
        # Not a WAV at all
        entry("empty", "empty_audio", "zero-byte upload", b""),
        entry("three_bytes", "not_wav", "shorter than any RIFF header", b"RIF"),
        entry("riff_only", "truncated", "RIFF magic, header cut after 7 bytes", b"RIFF\x24\x00\x00"),
        entry("text_file", "not_wav", "a CSV renamed to .wav", b"name,voice\npicard,engage\n" * 10),
        entry("png", "not_wav", "a PNG renamed to .wav", png),
        entry("id3_mp3", "not_wav", "an MP3 with an ID3 tag renamed to .wav", id3),
        entry("rifx", "unsupported_format", "big-endian RIFX container", riff(good_body, magic=b"RIFX")),
        entry("rf64", "unsupported_format", "RF64 64-bit container",
              riff(good_body, magic=b"RF64", riff_size=0xFFFFFFFF)),
        entry("riff_avi", "not_wav", "RIFF but an AVI form type", riff(good_body, form=b"AVI ")),
        entry("riff_size_tiny", "malformed_wav", "RIFF size too small to hold 'WAVE'",
              riff(good_body, riff_size=2)),
        entry("riff_size_hides_chunks", "malformed_wav", "RIFF size says the file ends right after 'WAVE'",
              riff(good_body, riff_size=4)),
        # Cut short
        entry("header_only", "truncated", "RIFF/WAVE header and nothing else", riff(b"", riff_size=declared)),
        entry("fmt_header_only", "truncated", "fmt chunk header without its body",
              riff(b"fmt \x10\x00\x00\x00", riff_size=declared)),
        entry("fmt_body_cut", "truncated", "fmt body cut after 10 bytes",
              riff(fmt16[:18], riff_size=declared)),
        entry("data_header_no_samples", "truncated", "data chunk declared, no sample bytes present",
              riff(fmt16 + b"data" + struct.pack("<I", len(data6)), riff_size=declared)),
        entry("data_cut_mid_frame", "truncated", "stereo 16-bit samples cut one byte into a frame",
              riff(fmt_chunk(channels=2) + chunk(b"data", stereo_data))[:-1]),
        entry("data_size_lies_mid_frame", "truncated", "streaming sizes but an odd trailing byte",
              riff(fmt16 + streaming, riff_size=0xFFFFFFFF)),
        entry("no_data_chunk", "malformed_wav", "fmt and LIST but no data chunk", riff(fmt16 + list_chunk)),
        entry("no_chunks", "malformed_wav", "a consistent RIFF/WAVE header with no chunks", riff(b"")),
        # Lying sizes
        entry("list_runs_past_end", "malformed_wav", "a LIST chunk claims more bytes than the RIFF holds",
              riff(fmt16 + chunk(b"LIST", b"INFO", size=1_000_000) + D)),
        entry("fmt_size_huge", "malformed_wav", "fmt chunk claims 2 GiB",
              riff(chunk(b"fmt ", fmt16[8:], size=0x7FFFFFFF) + D)),
        entry("data_size_not_whole_frames", "malformed_wav", "data size is not a multiple of block_align",
              riff(fmt_chunk(channels=2) + chunk(b"data", stereo_data + b"\x00\x00"))),
        entry("zero_frames", "empty_audio", "RIFF/WAVE with a 0-frame data chunk",
              riff(fmt16 + chunk(b"data", b""))),
        # Impossible formats
        entry("zero_channels", "malformed_wav", "0 channels",
              with_fmt(channels=0, block_align=2, byte_rate=48000)),
        entry("channels_65535", "unsupported_format", "65535 channels would explode per-channel buffers",
              with_fmt(channels=65535, block_align=2, byte_rate=48000)),
        entry("channels_9", "unsupported_format", "more channels than supported", with_fmt(channels=9)),
        entry("rate_0", "malformed_wav", "sample rate 0 Hz divides by zero", with_fmt(sample_rate=0)),
        entry("rate_1", "unsupported_format", "sample rate 1 Hz makes 6 s of data last days",
              with_fmt(sample_rate=1)),
        entry("rate_4e9", "unsupported_format", "sample rate 4 GHz", with_fmt(sample_rate=4_000_000_000)),
        entry("rate_7999", "unsupported_format", "just below the 8 kHz floor", with_fmt(sample_rate=7999)),
        entry("rate_192001", "unsupported_format", "just above the 192 kHz ceiling",
              with_fmt(sample_rate=192_001)),
        entry("bits_0", "malformed_wav", "0 bits per sample",
              with_fmt(bits=0, block_align=2, byte_rate=48000)),
        entry("bits_7", "unsupported_format", "7-bit samples",
              with_fmt(bits=7, block_align=1, byte_rate=24000)),
        entry("bits_12", "unsupported_format", "12-bit packed samples",
              with_fmt(bits=12, block_align=2, byte_rate=48000)),
        entry("bits_64_int", "unsupported_format", "64-bit integer PCM", with_fmt(bits=64)),
        entry("float_16", "unsupported_format", "16-bit IEEE float does not exist in WAV",
              with_fmt(tag=3, bits=16)),
        entry("block_align_0", "malformed_wav", "block_align 0", with_fmt(block_align=0, byte_rate=48000)),
        entry("block_align_wrong", "malformed_wav", "block_align 4 for mono 16-bit", with_fmt(block_align=4)),
        entry("byte_rate_wrong", "malformed_wav", "byte_rate disagrees with rate x block_align",
              with_fmt(byte_rate=12345)),
        entry("fmt_too_short", "malformed_wav", "14-byte WAVEFORMAT without bits per sample",
              riff(chunk(b"fmt ", fmt16[8:22]) + D)),
        # Codecs we do not decode
        entry("ms_adpcm", "unsupported_format", "MS ADPCM",
              with_fmt(tag=2, bits=4, block_align=0, byte_rate=12000)),
        entry("ima_adpcm", "unsupported_format", "IMA ADPCM",
              with_fmt(tag=0x11, bits=4, block_align=256, byte_rate=12000)),
        entry("mu_law", "unsupported_format", "G.711 mu-law", with_fmt(tag=7, bits=8)),
        entry("a_law", "unsupported_format", "G.711 A-law", with_fmt(tag=6, bits=8)),
        entry("mp3_in_wav", "unsupported_format", "MP3 inside WAV",
              with_fmt(tag=0x55, bits=0, block_align=1, byte_rate=16000)),
        entry("gsm", "unsupported_format", "GSM 6.10",
              with_fmt(tag=0x31, bits=0, block_align=65, byte_rate=1625)),
        entry("tag_0", "unsupported_format", "format tag 0 (unknown)", with_fmt(tag=0)),
        entry("extensible_bogus_guid", "unsupported_format", "WAVE_FORMAT_EXTENSIBLE with a random GUID",
              ext(subformat=b"\xde\xad\xbe\xef" * 4)),
        entry("extensible_mu_law", "unsupported_format", "WAVE_FORMAT_EXTENSIBLE wrapping mu-law",
              ext(extensible_subtag=7, bits=8)),
        entry("extensible_short", "malformed_wav", "WAVE_FORMAT_EXTENSIBLE fmt cut to 18 bytes",
              riff(short_ext_fmt + D)),
        entry("extensible_cb_size_0", "malformed_wav", "WAVE_FORMAT_EXTENSIBLE with cbSize 0",
              ext(extensible_subtag=1, cb_size=0)),
        entry("extensible_valid_bits_too_many", "malformed_wav", "24 valid bits in a 16-bit container",
              ext(extensible_subtag=1, valid_bits=24)),
        # Structure attacks
        entry("data_before_fmt", "malformed_wav", "data chunk precedes fmt", riff(D + fmt16)),
        entry("two_fmt_conflicting", "malformed_wav", "two fmt chunks disagree on the sample rate",
              riff(fmt16 + fmt_chunk(sample_rate=8000) + D)),
        entry("junk_2mib_before_data", "malformed_wav", "a 2 MiB junk chunk before the samples",
              riff(fmt16 + chunk(b"junk", bytes(2 * 1024 * 1024)) + D)),
        entry("chunks_5000", "malformed_wav", "5000 empty chunks to make the parser loop",
              riff(fmt16 + tiny_chunks + D)),
        entry("binary_chunk_id", "malformed_wav", "a chunk id that is not a FourCC",
              riff(fmt16 + not_a_fourcc + D)),
        # Bad samples
        entry("float_nan", "invalid_samples", "a NaN float sample",
              riff(fmt_float + chunk(b"data", nan_samples.tobytes()))),
        entry("float_inf", "invalid_samples", "an infinite float sample",
              riff(fmt_float + chunk(b"data", inf_samples.tobytes()))),
        # Policy limits
        entry("oversize_20mib", "too_large", "a valid header followed by more than 20 MiB of samples",
              riff(fmt16 + chunk(b"data", bytes(oversize_payload)))),
        entry("one_second", "duration_out_of_range", "valid but only 1 s long", valid_wav(1.0)),
        entry("just_under_5s", "duration_out_of_range", "valid but 4.99 s long", valid_wav(4.99)),
        entry("sixty_one_seconds", "duration_out_of_range", "valid but 61 s long", valid_wav(61.0)),
        # Accepted, but poor material for cloning
        entry("silence_10s", None, "10 s of digital silence", riff(fmt16 + chunk(b"data", bytes(480_000)))),
        entry("very_quiet_10s", None, "speech peaking near -55 dBFS", wav_bytes(quiet, 24000)),
        entry("clipped_10s", None, "speech amplified 18 dB into hard clipping", wav_bytes(clipped, 24000)),
        entry("white_noise_10s", None, "10 s of white noise, no speech", wav_bytes(noise, 24000)),
        # Tolerated quirks of real writers (accepted, clean audio)
        entry("streaming_sizes_ffffffff", None, "a streaming writer left both sizes at 0xFFFFFFFF",
              riff(fmt16 + chunk(b"data", data6, size=0xFFFFFFFF), riff_size=0xFFFFFFFF)),
        entry("odd_chunk_padded", None, "an odd-sized chunk followed by its pad byte",
              riff(fmt16 + chunk(b"note", b"odd") + D)),
        entry("odd_chunk_unpadded", None, "an odd-sized chunk whose writer forgot the pad byte",
              riff(fmt16 + chunk(b"note", b"odd", pad=False) + D)),
        entry("trailing_garbage", None, "bytes after the RIFF end", good + b"\x00garbage after the RIFF"),
    ]
