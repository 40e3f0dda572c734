"""Streamed audio answers: pieces from the relay (or stored audio) encoded as they come.

`pcm` and `wav` (a streaming header: sizes 0xFFFFFFFF, as players expect from a live source) cost nothing
to produce; `mp3`, `opus` and `flac` are encoded incrementally by libsndfile, each piece's frames leaving
as soon as they are encoded. `speed` other than 1 time-stretches every piece (a phase vocoder, so the pitch
stays) before it is encoded. Server-sent events carry the same bytes, base64, in `speech.audio.delta` events.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi.responses import StreamingResponse

from timbre_common.audio import RESPONSE_FORMATS, decode_wav, resample, to_mono
from timbre_common.logging import get_logger

from ..adapters.stream_relay import Piece, Stream, StreamBroken

log = get_logger(__name__)

_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
# Stored audio is streamed in pieces of this many seconds.
STORED_PIECE_S = 1.0


class StreamAborted(Exception):
    """Raised inside a streamed body so the server cuts the connection without the final empty chunk: the
    client's HTTP library reports an incomplete body instead of taking a truncated file for a whole one."""


def _float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def _pcm16(samples: np.ndarray) -> bytes:
    return np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def streaming_wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header whose sizes say "unknown length" (0xFFFFFFFF)."""
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", 0xFFFFFFFF))


class _Sink(io.RawIOBase):
    """A file for libsndfile that hands out bytes as they are written. A rewrite of bytes already sent (a
    header's length fields at close) is dropped: stream formats are valid without it."""

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()
        self._pos = 0
        self._sent = 0

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        data = bytes(data)
        end = self._pos + len(data)
        if end > len(self._buf):
            self._buf.extend(b"\0" * (end - len(self._buf)))
        self._buf[self._pos:end] = data
        self._pos = end
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else len(self._buf) + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        data = bytes(self._buf[self._pos:] if n < 0 else self._buf[self._pos:self._pos + n])
        self._pos += len(data)
        return data

    def take(self) -> bytes:
        out = bytes(self._buf[self._sent:])
        self._sent = len(self._buf)
        return out


class Encoder:
    """Float pieces in, bytes of one response format out, piece by piece."""

    def __init__(self, fmt: str, sample_rate: int, *, speed: float = 1.0, out_rate: int | None = None) -> None:
        self.fmt, self.in_rate, self.speed = fmt, sample_rate, speed
        if fmt == "opus":
            out_rate = 24000 if sample_rate not in (8000, 12000, 16000, 24000, 48000) else sample_rate
        elif fmt == "mp3" and sample_rate not in _MP3_RATES:
            out_rate = 24000
        self.out_rate = out_rate or sample_rate
        self._file = None
        self._sink: _Sink | None = None
        if fmt in ("mp3", "opus", "flac"):
            import soundfile  # deferred: libsndfile is loaded only when a compressed stream is asked for

            container, subtype = {"mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS"),
                                  "flac": ("FLAC", "PCM_16")}[fmt]
            self._sink = _Sink()
            self._file = soundfile.SoundFile(self._sink, "w", samplerate=self.out_rate, channels=1,
                                             format=container, subtype=subtype)

    @property
    def content_type(self) -> str:
        if self.fmt == "pcm":
            return f"{RESPONSE_FORMATS['pcm']}; rate={self.out_rate}; channels=1; format=s16le"
        return RESPONSE_FORMATS[self.fmt]

    def start(self) -> bytes:
        return streaming_wav_header(self.out_rate) if self.fmt == "wav" else b""

    def _prepare(self, samples: np.ndarray) -> np.ndarray:
        if samples.size and self.speed != 1.0:
            import librosa  # deferred: only a change of speed needs it

            samples = librosa.effects.time_stretch(samples, rate=self.speed).astype(np.float32)
        if samples.size and self.out_rate != self.in_rate:
            samples = resample(samples, self.in_rate, self.out_rate)
        return np.clip(samples, -1.0, 1.0)

    def encode(self, samples: np.ndarray) -> bytes:
        samples = self._prepare(samples)
        if self._file is None:
            return _pcm16(samples)
        assert self._sink is not None
        if samples.size:
            self._file.write(samples)
        return self._sink.take()

    def close(self) -> bytes:
        if self._file is None:
            return b""
        assert self._sink is not None
        self._file.close()
        return self._sink.take()


def stored_pieces(wav: bytes, speed: float = 1.0) -> tuple[int, list[np.ndarray]]:
    """Stored audio (a cache hit) cut into pieces, to go through the same encoder as live ones. A change of
    speed is made over the whole audio first (cut points fall mid-word, unlike live pieces' pauses)."""
    samples, rate = decode_wav(wav)
    mono = to_mono(samples).astype(np.float32)
    if speed != 1.0 and mono.size:
        import librosa  # deferred: only a change of speed needs it

        mono = np.clip(librosa.effects.time_stretch(mono, rate=speed), -1.0, 1.0).astype(np.float32)
    step = max(1, int(rate * STORED_PIECE_S))
    return rate, [mono[i:i + step] for i in range(0, mono.size, step)] or [mono]


async def _encode(encoder: Encoder, samples: np.ndarray) -> bytes:
    # Compressed formats and time stretching take real CPU: off the event loop.
    if encoder.fmt in ("wav", "pcm") and encoder.speed == 1.0 and encoder.out_rate == encoder.in_rate:
        return encoder.encode(samples)
    return await asyncio.to_thread(encoder.encode, samples)


async def _live_samples(stream: Stream, words: list[dict]) -> AsyncIterator[np.ndarray]:
    async for piece in stream.pieces():
        if piece.words is not None:
            words.extend(piece.words)
        yield _float(piece.pcm)


async def _stored_samples(pieces: list[np.ndarray]) -> AsyncIterator[np.ndarray]:
    for piece in pieces:
        yield piece


def _source(stream: Stream | None, stored: list[np.ndarray] | None, words: list[dict]) -> AsyncIterator[np.ndarray]:
    return _live_samples(stream, words) if stream is not None else _stored_samples(stored or [])


async def open_stream(stream: Stream) -> Piece:
    """The first piece of a live stream: a failure before any audio is raised here, before the answer starts."""
    try:
        return await stream.first()
    except BaseException:
        stream.close()
        raise


def audio_stream_response(fmt: str, headers: dict[str, str], *, stream: Stream | None = None,
                          sample_rate: int, stored: list[np.ndarray] | None = None, speed: float = 1.0,
                          out_rate: int | None = None, sse: bool = False,
                          on_done: Callable[[float], dict[str, Any]] | None = None,
                          timestamps: bool = False, words: list[dict] | None = None,
                          stretched: float | None = None) -> StreamingResponse:
    """A 200 whose body is the audio as it comes: from a live `stream` (its first piece already taken by
    `open_stream`) or from `stored` pieces (a cache hit). With `sse`, OpenAI's speech events instead, and
    with `timestamps` a `speech.audio.timestamps` event of every word (from the last live piece, or `words`)
    before the closing `speech.audio.done`. `stretched`: the speed stored pieces were already changed by."""
    encoder = Encoder(fmt, sample_rate, speed=speed, out_rate=out_rate)
    timing = stretched or speed
    job_id = headers.get("X-Job-Id", "")

    async def audio_bytes() -> AsyncIterator[bytes]:
        seconds = 0.0
        try:
            head = encoder.start()
            if head:
                yield head
            async for samples in _source(stream, stored, []):
                seconds += samples.size / sample_rate
                data = await _encode(encoder, samples)
                if data:
                    yield data
            tail = await asyncio.to_thread(encoder.close)
            if tail:
                yield tail
            log.info("audio_stream_finished", job_id=job_id, audio_seconds=round(seconds, 3), live=stream is not None)
        except StreamBroken as exc:
            log.warning("audio_stream_broken", job_id=job_id, code=exc.code, reason=exc.message)
            raise StreamAborted(f"{exc.code}: {exc.message}") from exc
        finally:
            if stream is not None:
                stream.close()

    async def events() -> AsyncIterator[bytes]:
        seconds = 0.0
        try:
            head = encoder.start()
            pending = head
            heard: list[dict] = list(words or [])
            async for samples in _source(stream, stored, heard):
                seconds += samples.size / sample_rate
                data = pending + await _encode(encoder, samples)
                pending = b""
                if data:
                    yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
            tail = pending + await asyncio.to_thread(encoder.close)
            if tail:
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(tail).decode("ascii")})
            if timestamps:
                yield _sse({"type": "speech.audio.timestamps", "words": [
                    {**w, "start": round(w["start"] / timing, 3), "end": round(w["end"] / timing, 3)} for w in heard]})
            # on_done gets the seconds of audio as sent (after any change of speed).
            done = {"type": "speech.audio.done", **(on_done(seconds / speed) if on_done else {})}
            yield _sse(done)
        except StreamBroken as exc:
            log.warning("audio_stream_broken", job_id=job_id, code=exc.code, reason=exc.message)
            yield _sse({"type": "error", "error": {"type": "server_error", "code": exc.code,
                                                   "message": exc.message, "param": None}})
        finally:
            if stream is not None:
                stream.close()

    if sse:
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    return StreamingResponse(audio_bytes(), media_type=encoder.content_type, headers=headers)


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
