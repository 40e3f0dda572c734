"""The streaming relay over the real broker: a worker's StreamSender to a gateway instance's stream queue."""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aio_pika
import numpy as np
import pytest

from timbre_common.contracts.synthesis import SynthesisChunk, SynthesisRequested
from timbre_common.messaging import Bus
from timbre_common.messaging.topology import delete_topology
from timbre_gateway.adapters.stream_relay import StreamBroken, StreamRelay, StreamTimeouts
from timbre_gpu_worker.handlers import StreamSender


@pytest.fixture
async def buses(amqp_url: str, bus_namespace: str):
    gateway = await Bus(url=amqp_url, namespace=bus_namespace, service="gateway").connect()
    worker = await Bus(url=amqp_url, namespace=bus_namespace, service="gpu_worker").connect()
    yield gateway, worker
    await worker.close()
    await gateway.close()
    conn = await aio_pika.connect(amqp_url)
    await delete_topology(await conn.channel(), gateway.names)
    await conn.close()


def _order(relay: StreamRelay, stream_id: str) -> SynthesisRequested:
    return SynthesisRequested(job_id="00000000-0000-4000-8000-000000000001", account_id="a", voice_id="v",
                              text="t", lang="en", backend="embedded", cache_key="k",
                              job_created_at=datetime.now(UTC), stream_to=relay.queue_name, stream_id=stream_id)


async def test_pieces_made_in_a_thread_reach_the_stream_in_order(buses):
    gateway, worker = buses
    relay = StreamRelay(gateway, timeouts=StreamTimeouts(start_s=10, idle_s=10, gap_s=1))
    await relay.start()
    stream = relay.open()
    sender = StreamSender(worker, _order(relay, stream.stream_id))
    sink = sender.sink()
    pieces = [np.full(100 * (i + 1), 0.1 * (i + 1), np.float32) for i in range(4)]

    def backend() -> None:  # what a backend does from its own thread
        for i, piece in enumerate(pieces):
            sink(piece, 24000, i, len(pieces))

    await asyncio.to_thread(backend)
    await sender.close()
    got = [p async for p in stream.pieces()]
    assert [p.seq for p in got] == [0, 1, 2, 3] and got[-1].final and not got[0].final
    assert [len(p.pcm) for p in got] == [200, 400, 600, 800] and got[0].sample_rate == 24000
    assert np.frombuffer(got[2].pcm, "<i2")[0] == round(0.3 * 32767)


async def test_out_of_order_and_failed_streams_over_the_broker(buses):
    gateway, worker = buses
    relay = StreamRelay(gateway, timeouts=StreamTimeouts(start_s=5, idle_s=1, gap_s=0.5))
    await relay.start()

    stream = relay.open()
    for seq in (2, 0, 1):
        await worker.send(relay.queue_name, SynthesisChunk(job_id="j", stream_id=stream.stream_id, seq=seq,
                                                           final=seq == 2, sample_rate=24000), body=b"\0\0")
    assert [p.seq async for p in stream.pieces()] == [0, 1, 2]

    stream = relay.open()
    sender = StreamSender(worker, _order(relay, stream.stream_id))
    await sender.send(b"\0\0", 24000, seq=0, final=False, total=3)
    await sender.fail("synthesis_failed", "the model ran out of memory")
    seqs = []
    with pytest.raises(StreamBroken) as exc:
        async for p in stream.pieces():
            seqs.append(p.seq)
    assert seqs == [0] and exc.value.code == "synthesis_failed" and "memory" in exc.value.message


async def test_a_piece_for_a_gateway_that_is_gone_is_dropped_quietly(buses):
    gateway, worker = buses
    await worker.send(gateway.names.stream_queue("nobody"),
                      SynthesisChunk(job_id="j", stream_id="s", seq=0, sample_rate=24000), body=b"\0\0")
