"""Audio helpers shared by every service: a strict WAV parser, decoding, resampling, quality scoring,
joining synthesized chunks and transcoding to the response formats.

The parser is the trust boundary for user uploads: it is pure Python over ``struct``, it only raises
``AudioError`` for any byte input, and it never allocates from a size a header claims.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "AudioError",
    "WavInfo",
    "QualityReport",
    "RESPONSE_FORMATS",
    "sniff_content_type",
    "parse_wav",
    "decode_wav",
    "to_mono",
    "crossfade_join",
    "resample",
    "encode_wav",
    "validate_reference",
    "normalise_reference",
    "quality_report",
    "join_chunks",
    "transcode",
]

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8
MAX_CHUNKS = 1_000
# Metadata before the samples is small in every real writer; a bigger header is an attack or junk.
MAX_HEADER_BYTES = 1024 * 1024

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# KSDATAFORMAT_SUBTYPE_* GUIDs share this tail after the little-endian format tag.
_SUBFORMAT_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_CODEC_NAMES = {
    0x0002: "MS ADPCM",
    0x0006: "A-law",
    0x0007: "mu-law",
    0x0011: "IMA ADPCM",
    0x0031: "GSM 6.10",
    0x0050: "MPEG",
    0x0055: "MP3",
    0x0092: "AC-3",
    0x00FF: "AAC",
    0x1610: "AAC",
    0x704F: "Opus",
    0xF1AC: "FLAC",
}
_PCM_BITS = (8, 16, 24, 32)
_FLOAT_BITS = (32, 64)

# 20 ms analysis frames; below this level a frame counts as silence.
_FRAME_S = 0.02
_SILENCE_DBFS = -50.0
_DB_FLOOR = -120.0
_NORMALISE_PEAK_DBFS = -1.0
# A near-silent upload must not have its noise floor blown up to full scale.
_MAX_NORMALISE_GAIN_DB = 40.0

AudioErrorCode = Literal[
    "not_wav",
    "unsupported_format",
    "malformed_wav",
    "truncated",
    "empty_audio",
    "invalid_samples",
    "duration_out_of_range",
    "too_large",
]


class AudioError(Exception):
    """Audio that cannot be accepted; ``code`` is stable and machine-readable, ``message`` is for people."""

    def __init__(self, code: AudioErrorCode | str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class WavInfo:
    """What a WAV header says about its samples, after validation."""

    format: Literal["pcm", "float"]
    channels: int
    sample_rate: int
    bits_per_sample: int
    frames: int
    data_offset: int
    data_size: int

    @property
    def duration_s(self) -> float:
        """Length of the audio in seconds."""
        return self.frames / self.sample_rate

    @property
    def block_align(self) -> int:
        """Bytes per frame (all channels)."""
        return self.channels * self.bits_per_sample // 8


# ---------------------------------------------------------------------------------------------------------
# Parsing


def _is_fourcc(chunk_id: bytes) -> bool:
    return len(chunk_id) == 4 and all(0x20 <= b <= 0x7E for b in chunk_id)


@dataclass(frozen=True)
class _Format:
    kind: Literal["pcm", "float"]
    channels: int
    sample_rate: int
    bits: int


def _parse_fmt(body: bytes) -> _Format:
    if len(body) < 16:
        raise AudioError("malformed_wav", f"fmt chunk is {len(body)} bytes, at least 16 are needed")
    tag, channels, sample_rate, byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", body, 0)

    if tag == _WAVE_FORMAT_EXTENSIBLE:
        if len(body) < 40:
            raise AudioError("malformed_wav", "WAVE_FORMAT_EXTENSIBLE fmt chunk is shorter than 40 bytes")
        cb_size, valid_bits, _channel_mask = struct.unpack_from("<HHI", body, 16)
        subformat = body[24:40]
        if cb_size < 22:
            raise AudioError("malformed_wav", f"WAVE_FORMAT_EXTENSIBLE cbSize is {cb_size}, expected 22")
        if subformat[2:] != _SUBFORMAT_GUID_TAIL:
            raise AudioError("unsupported_format", "WAVE_FORMAT_EXTENSIBLE with an unknown subformat GUID")
        (tag,) = struct.unpack_from("<H", subformat, 0)
        # Zero means "all bits valid" for several writers; more valid bits than the container is a lie.
        if valid_bits > bits:
            raise AudioError("malformed_wav", f"{valid_bits} valid bits in a {bits}-bit container")

    if tag == _WAVE_FORMAT_PCM:
        kind: Literal["pcm", "float"] = "pcm"
    elif tag == _WAVE_FORMAT_IEEE_FLOAT:
        kind = "float"
    else:
        codec = _CODEC_NAMES.get(tag, f"format tag 0x{tag:04x}")
        raise AudioError("unsupported_format", f"{codec} is not supported; upload PCM or float WAV")

    if channels == 0:
        raise AudioError("malformed_wav", "zero channels")
    if channels > MAX_CHANNELS:
        raise AudioError("unsupported_format", f"{channels} channels; at most {MAX_CHANNELS} are supported")
    if sample_rate == 0:
        raise AudioError("malformed_wav", "sample rate is zero")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            "unsupported_format",
            f"sample rate {sample_rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz",
        )
    if bits == 0:
        raise AudioError("malformed_wav", "zero bits per sample")
    allowed_bits = _PCM_BITS if kind == "pcm" else _FLOAT_BITS
    if bits not in allowed_bits:
        raise AudioError("unsupported_format", f"{bits}-bit {kind} samples are not supported")
    expected_align = channels * bits // 8
    if block_align != expected_align:
        raise AudioError(
            "malformed_wav", f"block_align {block_align} does not match {channels} x {bits}-bit samples"
        )
    if byte_rate != sample_rate * expected_align:
        raise AudioError(
            "malformed_wav", f"byte_rate {byte_rate} does not match {sample_rate} Hz x {expected_align} bytes"
        )
    return _Format(kind=kind, channels=channels, sample_rate=sample_rate, bits=bits)


def parse_wav(data: bytes) -> WavInfo:
    """Validate a RIFF/WAVE file's structure and describe its samples; raises only ``AudioError``."""
    try:
        return _parse_wav(data)
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract is that hostile bytes only ever yield AudioError
        raise AudioError("malformed_wav", f"unparseable WAV ({type(exc).__name__})") from exc


def _parse_wav(data: bytes) -> WavInfo:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AudioError("not_wav", f"expected bytes, got {type(data).__name__}")
    data = bytes(data) if not isinstance(data, bytes) else data
    if len(data) == 0:
        raise AudioError("empty_audio", "the file is empty")
    magic = data[:4]
    if magic == b"RIFX":
        raise AudioError("unsupported_format", "big-endian RIFX WAV is not supported")
    if magic == b"RF64":
        raise AudioError("unsupported_format", "RF64 WAV is not supported")
    if magic != b"RIFF":
        raise AudioError("not_wav", "not a RIFF file")
    if len(data) < 12:
        raise AudioError("truncated", "the RIFF header is cut short")
    if data[8:12] != b"WAVE":
        raise AudioError("not_wav", "a RIFF file, but not WAVE")

    (riff_size,) = struct.unpack_from("<I", data, 4)
    if riff_size < 4:
        raise AudioError("malformed_wav", f"RIFF size {riff_size} cannot hold a WAVE header")
    claimed_end = 8 + riff_size
    # Streaming writers leave the RIFF size at 0xFFFFFFFF or a guess: trust only the bytes present.
    end = min(claimed_end, len(data))
    cut_short = claimed_end > len(data)
    overrun_code = "truncated" if cut_short else "malformed_wav"

    fmt: _Format | None = None
    pos = 12
    chunks = 0
    while pos + 8 <= end:
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        if not _is_fourcc(chunk_id):
            raise AudioError("malformed_wav", f"invalid chunk id at byte {pos}")
        chunks += 1
        if chunks > MAX_CHUNKS:
            raise AudioError("malformed_wav", f"more than {MAX_CHUNKS} chunks before the samples")
        body_start = pos + 8

        if chunk_id == b"data":
            if fmt is None:
                raise AudioError("malformed_wav", "data chunk before the fmt chunk")
            return _data_info(fmt, body_start, size, available=end - body_start)

        if body_start + size > 12 + MAX_HEADER_BYTES:
            raise AudioError(
                "malformed_wav", f"more than {MAX_HEADER_BYTES} bytes of chunks before the samples"
            )
        if body_start + size > end:
            raise AudioError(overrun_code, f"chunk {chunk_id!r} runs past the end of the file")

        if chunk_id == b"fmt ":
            if fmt is not None:
                raise AudioError("malformed_wav", "more than one fmt chunk")
            fmt = _parse_fmt(data[body_start : body_start + size])

        pos = _next_chunk(data, body_start + size, end)

    if fmt is None:
        raise AudioError(overrun_code, "no fmt chunk")
    raise AudioError(overrun_code, "no data chunk")


def _next_chunk(data: bytes, unpadded: int, end: int) -> int:
    if unpadded % 2 == 0:
        return unpadded
    padded = unpadded + 1
    # Some writers forget the pad byte after an odd-sized chunk; follow whichever offset holds a chunk id.
    padded_is_chunk = _is_fourcc(data[padded : padded + 4])
    if padded + 4 <= end and not padded_is_chunk and _is_fourcc(data[unpadded : unpadded + 4]):
        return unpadded
    return padded


def _data_info(fmt: _Format, offset: int, claimed_size: int, available: int) -> WavInfo:
    block_align = fmt.channels * fmt.bits // 8
    if claimed_size == 0:
        raise AudioError("empty_audio", "the data chunk holds no samples")
    if claimed_size <= available:
        size = claimed_size
        if size % block_align:
            raise AudioError(
                "malformed_wav", f"data size {size} is not a whole number of {block_align}-byte frames"
            )
    else:
        size = max(available, 0)
        if size == 0:
            raise AudioError("truncated", "the data chunk is cut short before its first sample")
        if size % block_align:
            raise AudioError("truncated", "the data chunk is cut short in the middle of a frame")
    return WavInfo(
        format=fmt.kind,
        channels=fmt.channels,
        sample_rate=fmt.sample_rate,
        bits_per_sample=fmt.bits,
        frames=size // block_align,
        data_offset=offset,
        data_size=size,
    )


# ---------------------------------------------------------------------------------------------------------
# Decoding and encoding


def _samples(data: bytes, info: WavInfo) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8, count=info.data_size, offset=info.data_offset)
    bits = info.bits_per_sample
    if info.format == "float":
        values = raw.view("<f4" if bits == 32 else "<f8")
        if not np.all(np.isfinite(values)):
            raise AudioError("invalid_samples", "float samples contain NaN or infinity")
        out = np.clip(values, -1.0, 1.0).astype(np.float32)
    elif bits == 8:
        out = (raw.astype(np.float32) - 128.0) * np.float32(1 / 128)
    elif bits == 16:
        out = raw.view("<i2").astype(np.float32) * np.float32(1 / 32768)
    elif bits == 24:
        triples = raw.reshape(-1, 3).astype(np.int32)
        # Place the 3 bytes in the top of an int32 and shift back down to sign-extend.
        ints = ((triples[:, 0] << 8) | (triples[:, 1] << 16) | (triples[:, 2] << 24)) >> 8
        out = ints.astype(np.float32) * np.float32(1 / 8_388_608)
    else:
        out = (raw.view("<i4").astype(np.float64) * (1 / 2_147_483_648)).astype(np.float32)
    return out.reshape(info.frames, info.channels)


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a WAV to float32 samples shaped (frames, channels) in [-1, 1], plus the sample rate."""
    info = parse_wav(data)
    try:
        return _samples(bytes(data), info), info.sample_rate
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - keep the only-AudioError contract for hostile input
        raise AudioError("malformed_wav", f"undecodable samples ({type(exc).__name__})") from exc


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average the channels of (frames, channels) audio into a 1-D float32 array."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        return arr
    if arr.ndim != 2:
        raise ValueError(f"expected 1-D or (frames, channels) audio, got shape {arr.shape}")
    if arr.shape[1] == 1:
        return arr[:, 0].copy()
    return arr.mean(axis=1, dtype=np.float32)


def resample(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Band-limited resampling of 1-D (or per-column 2-D) audio; returns float32."""
    if sr_from <= 0 or sr_to <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_from} -> {sr_to}")
    arr = np.asarray(x, dtype=np.float32)
    if sr_from == sr_to or arr.shape[0] == 0:
        return arr.copy()
    try:
        from scipy.signal import resample_poly
    except ImportError:  # scipy is optional: only the GPU image is guaranteed to ship it
        return _resample_sinc(arr, sr_from, sr_to)
    g = math.gcd(sr_from, sr_to)
    return resample_poly(arr, sr_to // g, sr_from // g, axis=0).astype(np.float32)


def _resample_sinc(x: np.ndarray, sr_from: int, sr_to: int, half_taps: int = 32) -> np.ndarray:
    """Kaiser-windowed sinc interpolation evaluated at each output instant (numpy-only fallback)."""
    if x.ndim == 2:
        columns = [_resample_sinc(x[:, c], sr_from, sr_to, half_taps) for c in range(x.shape[1])]
        return np.stack(columns, axis=1)
    n_in = x.shape[0]
    n_out = int(math.ceil(n_in * sr_to / sr_from))
    ratio = sr_from / sr_to
    # Below 1 when downsampling: widen the kernel and lower the cutoff to stop aliasing.
    cutoff = min(1.0, sr_to / sr_from) * 0.97
    width = int(math.ceil(half_taps / min(1.0, cutoff)))
    padded = np.concatenate([np.zeros(width), x.astype(np.float64), np.zeros(width + 1)])
    out = np.empty(n_out, dtype=np.float32)
    offsets = np.arange(-width + 1, width + 1)
    beta = 8.6
    block = max(1, 262_144 // (2 * width))
    for start in range(0, n_out, block):
        t = np.arange(start, min(n_out, start + block)) * ratio
        idx = np.floor(t).astype(np.int64)[:, None] + offsets[None, :]
        dist = t[:, None] - idx
        taper = np.clip(1.0 - (dist / width) ** 2, 0.0, 1.0)
        window = np.i0(beta * np.sqrt(taper)) / np.i0(beta)
        kernel = cutoff * np.sinc(cutoff * dist) * window
        out[start : start + len(t)] = np.sum(padded[idx + width] * kernel, axis=1)
    return out


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """Encode audio (1-D, or averaged to mono) as a 16-bit PCM mono WAV, clipping to [-1, 1]."""
    if not isinstance(sample_rate, (int, np.integer)) or not 1 <= int(sample_rate) <= 0xFFFFFFFF // 2:
        raise ValueError(f"invalid sample rate {sample_rate!r}")
    sample_rate = int(sample_rate)
    mono = to_mono(samples)
    clean = np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0)
    pcm = np.round(np.clip(clean, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(pcm),
        b"WAVE",
        b"fmt ",
        16,
        _WAVE_FORMAT_PCM,
        1,
        sample_rate,
        sample_rate * 2,
        2,
        16,
        b"data",
        len(pcm),
    )
    return header + pcm


# ---------------------------------------------------------------------------------------------------------
# Reference audio


def validate_reference(
    data: bytes, *, min_s: float = 5.0, max_s: float = 60.0, max_bytes: int = 20 * 1024 * 1024
) -> WavInfo:
    """Accept a reference recording only if it is a decodable PCM/float WAV of the allowed size and length."""
    try:
        size = len(data)
    except TypeError:
        raise AudioError("not_wav", f"expected bytes, got {type(data).__name__}") from None
    if size > max_bytes:
        raise AudioError("too_large", f"the file is {size} bytes; the limit is {max_bytes}")
    info = parse_wav(data)
    if not min_s <= info.duration_s <= max_s:
        raise AudioError(
            "duration_out_of_range",
            f"the recording is {info.duration_s:.2f} s; it must be {min_s:g}-{max_s:g} s",
        )
    # Decoding catches bad samples (NaN/inf floats) that the header cannot reveal.
    decode_wav(data)
    return info


def normalise_reference(data: bytes, target_sr: int = 24000) -> bytes:
    """Turn an accepted upload into what the models get: mono, ``target_sr`` Hz, peak near -1 dBFS, 16-bit."""
    samples, sr = decode_wav(data)
    mono = to_mono(samples)
    mono = mono - np.float32(mono.mean()) if mono.size else mono
    mono = resample(mono, sr, target_sr)
    peak = float(np.max(np.abs(mono))) if mono.size else 0.0
    if peak > 0.0:
        target_peak = 10 ** (_NORMALISE_PEAK_DBFS / 20)
        gain = min(target_peak / peak, 10 ** (_MAX_NORMALISE_GAIN_DB / 20))
        mono = mono * np.float32(gain)
    return encode_wav(mono, target_sr)


@dataclass(frozen=True)
class QualityReport:
    """Objective measurements of a reference recording.

    ``grade`` is "good" (no issues), "fair" (minor issues) or "poor" (mostly silence, heavy clipping,
    SNR under 10 dB, or RMS under -45 dBFS). Levels are dBFS floored at -120; ``snr_db`` compares the
    loudest 20 % of 20 ms frames with the quietest 10 % and is capped at 100. ``issues`` holds any of
    "too_quiet" (RMS < -35 dBFS), "clipping" (> 0.1 % of samples at full scale), "mostly_silence" (> half
    the frames under -50 dBFS), "noisy" (SNR < 15 dB) and "low_sample_rate" (< 16 kHz).
    """

    duration_s: float
    sample_rate: int
    channels: int
    rms_dbfs: float
    peak_dbfs: float
    clipping_ratio: float
    silence_ratio: float
    snr_db: float
    grade: Literal["good", "fair", "poor"]
    issues: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (issues as a list)."""
        out = asdict(self)
        out["issues"] = list(self.issues)
        return out


def _dbfs(amplitude: float) -> float:
    if amplitude <= 0.0:
        return _DB_FLOOR
    return max(_DB_FLOOR, 20.0 * math.log10(amplitude))


def quality_report(data: bytes) -> QualityReport:
    """Measure level, clipping, silence and noise of a WAV and grade it for voice cloning."""
    info = parse_wav(data)
    samples, sr = decode_wav(data)
    mono = to_mono(samples).astype(np.float64)

    rms = float(np.sqrt(np.mean(mono**2))) if mono.size else 0.0
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    # One step below full scale counts as clipped: a clipped PCM signal sits on the extreme codes.
    if info.format == "pcm":
        clip_level = (2 ** (info.bits_per_sample - 1) - 2) / 2 ** (info.bits_per_sample - 1)
    else:
        clip_level = 0.999
    clipping_ratio = float(np.mean(np.abs(samples) >= clip_level)) if samples.size else 0.0

    frame_len = max(1, int(sr * _FRAME_S))
    n_frames = mono.size // frame_len
    if n_frames == 0:
        frame_power = np.array([np.mean(mono**2)]) if mono.size else np.zeros(1)
    else:
        frame_power = np.mean(mono[: n_frames * frame_len].reshape(n_frames, frame_len) ** 2, axis=1)
    silence_power = 10 ** (_SILENCE_DBFS / 10)
    silence_ratio = float(np.mean(frame_power < silence_power))

    ordered = np.sort(frame_power)
    loud = float(np.mean(ordered[int(len(ordered) * 0.8) :]))
    quiet = float(np.mean(ordered[: max(1, int(len(ordered) * 0.1))]))
    if loud <= 0.0:
        snr_db = 0.0
    elif quiet <= loud * 1e-10:
        snr_db = 100.0
    else:
        snr_db = min(100.0, 10.0 * math.log10(loud / quiet))

    rms_dbfs = _dbfs(rms)
    issues: list[str] = []
    if rms_dbfs < -35.0:
        issues.append("too_quiet")
    if clipping_ratio > 0.001:
        issues.append("clipping")
    mostly_silence = silence_ratio > 0.5
    if mostly_silence:
        issues.append("mostly_silence")
    # On a silent file the SNR says nothing; "mostly_silence" already covers it.
    elif snr_db < 15.0:
        issues.append("noisy")
    if sr < 16_000:
        issues.append("low_sample_rate")

    poor = mostly_silence or clipping_ratio > 0.01 or snr_db < 10.0 or rms_dbfs < -45.0
    grade: Literal["good", "fair", "poor"] = "poor" if poor else ("fair" if issues else "good")
    return QualityReport(
        duration_s=round(info.duration_s, 3),
        sample_rate=sr,
        channels=info.channels,
        rms_dbfs=round(rms_dbfs, 2),
        peak_dbfs=round(_dbfs(peak), 2),
        clipping_ratio=round(clipping_ratio, 6),
        silence_ratio=round(silence_ratio, 4),
        snr_db=round(snr_db, 2),
        grade=grade,
        issues=tuple(issues),
    )


# ---------------------------------------------------------------------------------------------------------
# Synthesized output


def _ramp(n: int) -> np.ndarray:
    """A raised-cosine ramp from 0 to 1 over n samples."""
    return (0.5 - 0.5 * np.cos(np.linspace(0.0, math.pi, n, dtype=np.float64))).astype(np.float32)


def crossfade_join(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Join two pieces by overlapping a's end with b's start (raised-cosine, gains summing to one).

    The overlap is as long as the shorter of the two; the result is len(a) + len(b) - overlap samples.
    """
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    n = min(a.size, b.size)
    if n == 0:
        return np.concatenate([a, b])
    up = _ramp(n)
    mixed = a[a.size - n :] * (1.0 - up) + b[:n] * up
    return np.concatenate([a[: a.size - n], mixed, b[n:]]).astype(np.float32, copy=False)


def join_chunks(
    chunks: list[np.ndarray], sample_rate: int, pause_ms: int = 120, fade_ms: int = 10,
    crossfade_ms: int | None = None,
) -> np.ndarray:
    """Concatenate sentence audio.

    By default every edge gets a raised-cosine fade and sentences are separated by a pause. With
    `crossfade_ms`, neighbouring sentences overlap by that much instead (no pause, no dip to silence);
    only the outer edges are faded.
    """
    if sample_rate <= 0:
        raise ValueError(f"invalid sample rate {sample_rate}")
    fade_len = max(0, int(sample_rate * fade_ms / 1000))
    if crossfade_ms is not None:
        overlap = max(0, int(sample_rate * crossfade_ms / 1000))
        out = np.zeros(0, dtype=np.float32)
        for chunk in chunks:
            mono = to_mono(chunk).astype(np.float32, copy=False)
            if mono.size == 0:
                continue
            if out.size == 0:
                out = mono.copy()
                continue
            n = min(overlap, out.size // 2, mono.size // 2)
            out = np.concatenate([out[: out.size - n], crossfade_join(out[out.size - n :], mono)])
        n = min(fade_len, out.size // 2)
        if n > 0:
            ramp = _ramp(n)
            out[:n] *= ramp
            out[-n:] *= ramp[::-1]
        return out.astype(np.float32, copy=False)
    pause = np.zeros(max(0, int(sample_rate * pause_ms / 1000)), dtype=np.float32)
    pieces: list[np.ndarray] = []
    for chunk in chunks:
        mono = to_mono(chunk).copy()
        if mono.size == 0:
            continue
        n = min(fade_len, mono.size // 2)
        if n > 0:
            ramp = _ramp(n)
            mono[:n] *= ramp
            mono[-n:] *= ramp[::-1]
        if pieces:
            pieces.append(pause)
        pieces.append(mono)
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(pieces).astype(np.float32, copy=False)


RESPONSE_FORMATS: dict[str, str] = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "flac": "audio/flac",
    # audio/L16 is big-endian by RFC 2586, so little-endian raw samples get their own label;
    # transcode() appends "; rate=...; channels=1; format=s16le".
    "pcm": "audio/pcm",
}

_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def _nearest_supported_rate(sr: int, rates: tuple[int, ...]) -> int:
    if sr in rates:
        return sr
    higher = [r for r in rates if r >= sr]
    # Prefer going up so no bandwidth is lost.
    return min(higher) if higher else max(rates)


def sniff_content_type(data: bytes) -> str:
    """The audio container `data` starts with, as a media type (by its magic bytes, never by what a client
    claims); application/octet-stream when it is none Timbre knows."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[:4] == b"fLaC":
        return "audio/flac"
    if head[:4] == b"OggS":
        return "audio/ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "audio/webm"
    if head[4:8] == b"ftyp":
        return "audio/mp4"
    if head[:3] == b"ID3":
        return "audio/mpeg"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0:
        return "audio/aac"  # ADTS: sync word, layer 0
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        return "audio/mpeg"  # an MPEG audio frame without an ID3 tag
    return "application/octet-stream"


def transcode(wav_bytes: bytes, fmt: str) -> tuple[bytes, str]:
    """Convert a WAV to a response format; returns (body, content_type)."""
    if fmt not in RESPONSE_FORMATS:
        raise AudioError(
            "unsupported_format", f"unknown response format {fmt!r}; use one of {sorted(RESPONSE_FORMATS)}"
        )
    if fmt == "wav":
        parse_wav(wav_bytes)
        return bytes(wav_bytes), RESPONSE_FORMATS["wav"]
    samples, sr = decode_wav(wav_bytes)
    mono = np.clip(to_mono(samples), -1.0, 1.0)
    if fmt == "pcm":
        body = np.round(mono * 32767.0).astype("<i2").tobytes()
        return body, f"{RESPONSE_FORMATS['pcm']}; rate={sr}; channels=1; format=s16le"

    import soundfile  # deferred: libsndfile is loaded only by the services that transcode

    if fmt == "mp3":
        out_sr, container, subtype = _nearest_supported_rate(sr, _MP3_RATES), "MP3", "MPEG_LAYER_III"
    elif fmt == "opus":
        out_sr, container, subtype = _nearest_supported_rate(sr, _OPUS_RATES), "OGG", "OPUS"
    else:
        out_sr, container, subtype = sr, "FLAC", "PCM_16"
    if out_sr != sr:
        mono = np.clip(resample(mono, sr, out_sr), -1.0, 1.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, mono, out_sr, format=container, subtype=subtype)
    return buffer.getvalue(), RESPONSE_FORMATS[fmt]
