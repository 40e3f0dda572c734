"""Streamed audio encoding: every format decodes from its pieces, the WAV header says "unknown length",
speed changes the length and not the pitch, OpenAI's pcm rate is honoured."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from timbre_common.audio import encode_wav
from timbre_gateway.http.streaming import Encoder, stored_pieces, streaming_wav_header

RATE = 22050


def _tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _encode(fmt: str, pieces: list[np.ndarray], **kw: object) -> bytes:
    enc = Encoder(fmt, RATE, **kw)  # type: ignore[arg-type]
    return enc.start() + b"".join(enc.encode(p) for p in pieces) + enc.close()


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data)) as container:
        rate = container.streams.audio[0].rate
        return np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]), rate


def test_streaming_wav_header_and_body():
    data = _encode("wav", [_tone(0.5), _tone(0.5)])
    assert data[:44] == streaming_wav_header(RATE)
    assert struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    assert len(data) - 44 == RATE * 2  # one second of 16-bit mono


@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac"])
def test_compressed_formats_come_out_piece_by_piece_and_decode(fmt):
    enc = Encoder(fmt, RATE)
    sizes = [len(enc.start())]
    for _ in range(4):
        sizes.append(len(enc.encode(_tone(0.5))))
    tail = enc.close()
    assert sum(sizes[1:3]) > 0, "nothing left the encoder before the end"
    samples, rate = _decode(_encode(fmt, [_tone(0.5)] * 4))
    assert rate in (RATE, 24000, 48000) and samples.size / rate == pytest.approx(2.0, abs=0.1)
    assert tail is not None


def test_pcm_at_openais_rate_and_speed_stretches_time_not_pitch():
    pcm = _encode("pcm", [_tone(1.0)], out_rate=24000)
    assert len(pcm) // 2 == pytest.approx(24000, abs=2)
    fast = np.frombuffer(_encode("pcm", [_tone(1.0)], speed=2.0), "<i2").astype(np.float32)
    assert fast.size == pytest.approx(RATE / 2, rel=0.02)
    spectrum = np.abs(np.fft.rfft(fast * np.hanning(fast.size)))
    assert np.fft.rfftfreq(fast.size, 1 / RATE)[np.argmax(spectrum)] == pytest.approx(220, abs=10)


def test_stored_audio_is_cut_into_pieces_that_rejoin():
    wav = encode_wav(_tone(2.5), RATE)
    rate, pieces = stored_pieces(wav)
    assert rate == RATE and len(pieces) == 3 and sum(p.size for p in pieces) == int(RATE * 2.5)
