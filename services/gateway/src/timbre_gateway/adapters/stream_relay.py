"""The streaming relay: audio pieces of streamed jobs, from workers to the connection that waits for them.

Each gateway instance consumes a queue of its own (`{ns}.gateway.stream.{instance}`, exclusive, gone with
the instance). A streamed request opens a `Stream` here, and its queue name and stream id travel on the job's
work order; the worker sends every piece straight to that queue. Pieces carry a sequence number: the stream
puts them back in order, drops duplicates (a redelivered work order), and ends with `StreamBroken` (a clear
code and message) on a gap that is not filled in time, a worker that goes quiet, or a worker's own failure.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from timbre_common.contracts import Envelope
from timbre_common.contracts.synthesis import SynthesisChunk
from timbre_common.logging import get_logger

log = get_logger(__name__)


class StreamBroken(Exception):
    """A stream that cannot go on; `code` is stable, `message` says what the client can do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Piece:
    """One piece of audio, in order: mono s16le PCM at `sample_rate`."""

    seq: int
    pcm: bytes
    sample_rate: int
    final: bool
    total: int | None
    words: list[dict] | None = None


@dataclass(frozen=True)
class StreamTimeouts:
    # Until the first piece: the job may wait in its backend's queue behind others.
    start_s: float = 120.0
    # Between pieces once audio flows: longer than any one piece takes to make.
    idle_s: float = 20.0
    # How long a piece that arrived early waits for the one missing before it.
    gap_s: float = 3.0


class Stream:
    """The pieces of one streamed job, as they arrive; iterate with `pieces()`."""

    def __init__(self, relay: StreamRelay, stream_id: str, timeouts: StreamTimeouts) -> None:
        self.relay = relay
        self.stream_id = stream_id
        self.timeouts = timeouts
        self.job_id: str | None = None
        self.inbox: asyncio.Queue[tuple[SynthesisChunk, bytes]] = asyncio.Queue()
        self._first: Piece | None = None

    @property
    def target(self) -> str:
        return self.relay.queue_name

    async def first(self) -> Piece:
        """Wait for the first piece (so a failure before any audio can still be a proper HTTP error)."""
        self._iter = self._ordered()
        self._first = await anext(self._iter)
        return self._first

    async def pieces(self) -> AsyncIterator[Piece]:
        """Every piece in order, the first included; raises StreamBroken when the stream cannot go on."""
        if self._first is None:
            await self.first()
        assert self._first is not None
        yield self._first
        async for piece in self._iter:
            yield piece

    async def _ordered(self) -> AsyncIterator[Piece]:
        expected, attempt, buffered = 0, None, {}
        loop = asyncio.get_running_loop()
        gap_since: float | None = None
        while True:
            if buffered:
                gap_since = gap_since if gap_since is not None else loop.time()
                wait = max(0.0, self.timeouts.gap_s - (loop.time() - gap_since))
            else:
                wait = self.timeouts.start_s if expected == 0 else self.timeouts.idle_s
            try:
                chunk, body = await asyncio.wait_for(self.inbox.get(), wait)
            except TimeoutError:
                if buffered:
                    raise StreamBroken("stream_gap", f"piece {expected} of the audio never arrived; the whole "
                                       "audio will be at the job's audio URL when the job is ready") from None
                if expected == 0:
                    raise StreamBroken("stream_timeout", "no audio arrived in time; the job goes on and can be "
                                       "polled") from None
                raise StreamBroken("worker_lost", "the worker stopped sending audio mid-stream; the job is "
                                   "retried and its whole audio will be at the job's audio URL") from None
            self.job_id = chunk.job_id
            if attempt is None:
                attempt = chunk.attempt
            elif chunk.attempt != attempt:
                if expected == 0 and chunk.attempt > attempt:
                    attempt, buffered = chunk.attempt, {}  # nothing sent yet: follow the newer attempt
                elif chunk.attempt > attempt:
                    raise StreamBroken("worker_lost", "the worker was replaced mid-stream; the job's whole audio "
                                       "will be at the job's audio URL")
                else:
                    continue  # a late piece of an older attempt
            if chunk.error_code:
                raise StreamBroken(chunk.error_code, chunk.error or "synthesis failed")
            if chunk.seq < expected or chunk.seq in buffered:
                continue  # a duplicate (a redelivered work order speaking again)
            buffered[chunk.seq] = Piece(chunk.seq, body, chunk.sample_rate, chunk.final, chunk.total, chunk.words)
            while expected in buffered:
                piece = buffered.pop(expected)
                expected += 1
                gap_since = None
                yield piece
                if piece.final:
                    return

    def close(self) -> None:
        self.relay.forget(self.stream_id)


class StreamRelay:
    """One gateway instance's stream queue and the streams open on it."""

    def __init__(self, bus: Any, *, instance: str | None = None, timeouts: StreamTimeouts | None = None) -> None:
        self.bus = bus
        self.instance = instance or uuid.uuid4().hex[:12]
        self.queue_name: str = bus.names.stream_queue(self.instance)
        self.timeouts = timeouts or StreamTimeouts()
        self._streams: dict[str, Stream] = {}

    async def start(self) -> None:
        await self.bus.open_inbox(self.queue_name, self.on_chunk)

    def open(self) -> Stream:
        stream = Stream(self, str(uuid.uuid4()), self.timeouts)
        self._streams[stream.stream_id] = stream
        return stream

    def forget(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)

    async def on_chunk(self, chunk: SynthesisChunk, *, envelope: Envelope, body: bytes | None = None) -> None:
        stream = self._streams.get(chunk.stream_id) if isinstance(chunk, SynthesisChunk) else None
        if stream is None:
            # Its client went away (the job still completes and lands in storage and the cache).
            log.debug("stream_piece_unclaimed", stream_id=getattr(chunk, "stream_id", None))
            return
        stream.inbox.put_nowait((chunk, body or b""))
