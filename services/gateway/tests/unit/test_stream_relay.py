"""The streaming relay's ordering rules: reorder, duplicates, gaps, silence, a worker's failure, a new attempt."""
from __future__ import annotations

import pytest

from timbre_common.contracts.synthesis import SynthesisChunk
from timbre_common.messaging import Names
from timbre_common.testing import envelope
from timbre_gateway.adapters.stream_relay import StreamBroken, StreamRelay, StreamTimeouts


class InboxBus:
    names = Names("unit")

    async def open_inbox(self, queue, handler):  # type: ignore[no-untyped-def]
        self.queue, self.handler = queue, handler


def _relay(**timeouts: float) -> StreamRelay:
    return StreamRelay(InboxBus(), instance="i1", timeouts=StreamTimeouts(**{"start_s": 0.3, "idle_s": 0.3,
                                                                           "gap_s": 0.2, **timeouts}))


async def _send(relay: StreamRelay, stream_id: str, seq: int, *, final: bool = False, attempt: int = 1,
                error_code: str | None = None) -> None:
    chunk = SynthesisChunk(job_id="j", stream_id=stream_id, attempt=attempt, seq=seq, final=final,
                           sample_rate=24000, error_code=error_code, error="it broke" if error_code else None)
    await relay.on_chunk(chunk, envelope=envelope(), body=bytes([seq]) * 2)


async def _collect(stream) -> list[int]:  # type: ignore[no-untyped-def]
    return [p.seq async for p in stream.pieces()]


def test_the_queue_is_named_per_instance():
    assert _relay().queue_name == "unit.gateway.stream.i1"


async def test_pieces_out_of_order_come_out_in_order_and_duplicates_are_dropped():
    relay = _relay()
    stream = relay.open()
    for seq in (1, 0, 0, 2, 1):
        await _send(relay, stream.stream_id, seq)
    await _send(relay, stream.stream_id, 3, final=True)
    assert await _collect(stream) == [0, 1, 2, 3]


async def test_a_gap_that_is_not_filled_ends_the_stream():
    relay = _relay()
    stream = relay.open()
    await _send(relay, stream.stream_id, 0)
    await _send(relay, stream.stream_id, 2, final=True)
    got = []
    with pytest.raises(StreamBroken) as exc:
        async for piece in stream.pieces():
            got.append(piece.seq)
    assert got == [0] and exc.value.code == "stream_gap"


async def test_a_silent_worker_ends_the_stream():
    relay = _relay()
    stream = relay.open()
    await _send(relay, stream.stream_id, 0)
    got = []
    with pytest.raises(StreamBroken) as exc:
        async for piece in stream.pieces():
            got.append(piece.seq)
    assert got == [0] and exc.value.code == "worker_lost"


async def test_nothing_at_all_is_a_timeout_before_the_first_piece():
    stream = _relay().open()
    with pytest.raises(StreamBroken) as exc:
        await stream.first()
    assert exc.value.code == "stream_timeout"


async def test_a_worker_failure_ends_the_stream_with_its_reason():
    relay = _relay()
    stream = relay.open()
    await _send(relay, stream.stream_id, 0, error_code="unsupported_language")
    with pytest.raises(StreamBroken) as exc:
        await stream.first()
    assert exc.value.code == "unsupported_language" and exc.value.message == "it broke"


async def test_a_new_attempt_is_followed_before_audio_but_not_after():
    relay = _relay()
    stream = relay.open()
    await _send(relay, stream.stream_id, 0, attempt=2)
    await _send(relay, stream.stream_id, 1, attempt=1)  # a late piece of the older attempt: ignored
    await _send(relay, stream.stream_id, 1, attempt=2, final=True)
    assert await _collect(stream) == [0, 1]

    stream = relay.open()
    await _send(relay, stream.stream_id, 0, attempt=1)
    await _send(relay, stream.stream_id, 0, attempt=2)
    with pytest.raises(StreamBroken) as exc:
        await _collect(stream)
    assert exc.value.code == "worker_lost"


async def test_pieces_of_a_closed_stream_are_dropped():
    relay = _relay()
    stream = relay.open()
    stream.close()
    await _send(relay, stream.stream_id, 0)  # no error, nowhere to go
    assert stream.inbox.empty()
