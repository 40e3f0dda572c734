"""The messaging layer against the real broker: confirms, retry, dead-letter, dedupe, RPC."""
from __future__ import annotations

import asyncio
from typing import ClassVar

import aio_pika
import pytest

from timbre_common.contracts import Command, Event, Reply
from timbre_common.db import create_pool
from timbre_common.messaging import Bus, NotFound, PgDeduper, QueueSpec, RemoteError, RpcTimeout


class PingHappened(Event):
    TYPE: ClassVar[str] = "test.ping_happened"
    n: int


class BlobHappened(Event):
    TYPE: ClassVar[str] = "test.blob_happened"
    BINARY: ClassVar[bool] = True
    name: str


class Double(Command):
    TYPE: ClassVar[str] = "test.double"
    n: int


class Doubled(Reply):
    TYPE: ClassVar[str] = "test.doubled"
    n: int


SPEC = QueueSpec("test.consumer", (PingHappened.routing_key(), BlobHappened.routing_key()), max_attempts=2)
# The same queue bound to pings alone, for the consumers that handle only those.
PINGS = QueueSpec("test.consumer", (PingHappened.routing_key(),), max_attempts=2)


@pytest.fixture
async def bus(amqp_url: str, bus_namespace: str):
    b = await Bus(url=amqp_url, namespace=bus_namespace, service="svc", rpc_timeout=5).connect(declare=[SPEC])
    yield b
    await b.close()
    await _delete_namespace(amqp_url, bus_namespace)


async def _delete_namespace(amqp_url: str, ns: str) -> None:
    conn = await aio_pika.connect(amqp_url)
    ch = await conn.channel()
    from timbre_common.messaging import QUEUES, RETRY_DELAYS, Names

    names = Names(ns)
    for spec in [*QUEUES.values(), SPEC]:
        for q in [names.queue(spec.name), names.dlq(spec.name),
                  *[names.retry_queue(spec.name, d) for d in RETRY_DELAYS]]:
            await ch.queue_delete(q)
    await ch.queue_delete(names.rpc_queue("svc"))
    for ex in (names.events, names.dead_letters, names.retries):
        await ch.exchange_delete(ex)
    await conn.close()


async def _drain_dlq(bus: Bus, timeout: float = 10.0) -> aio_pika.abc.AbstractIncomingMessage:
    ch = await bus.connection.channel()
    q = await ch.get_queue(bus.names.dlq(SPEC.name))
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        msg = await q.get(fail=False)
        if msg is not None:
            await msg.ack()
            return msg
        await asyncio.sleep(0.1)
    raise AssertionError("nothing reached the dead-letter queue")


async def test_event_round_trip_carries_envelope_and_binary_body(bus: Bus):
    got: asyncio.Queue = asyncio.Queue()

    async def on_ping(msg, *, envelope):
        await got.put((msg, envelope, None))

    async def on_blob(msg, *, envelope, body):
        await got.put((msg, envelope, body))

    await bus.consume(SPEC, {PingHappened: on_ping, BlobHappened: on_blob})
    await bus.publish(PingHappened(n=7), account_id="acct-1", correlation_id="corr-1")
    await bus.publish(BlobHappened(name="x"), body=b"RIFF\x00binary")
    msg, env, _ = await asyncio.wait_for(got.get(), 5)
    assert msg == PingHappened(n=7)
    assert (env.account_id, env.correlation_id, env.version, env.type) == ("acct-1", "corr-1", 1, "test.ping_happened")
    msg, env, body = await asyncio.wait_for(got.get(), 5)
    assert msg.name == "x" and body == b"RIFF\x00binary"


async def test_a_handler_table_that_does_not_match_its_queue_is_refused(bus: Bus):
    with pytest.raises(ValueError, match="have no handler"):
        await bus.consume(SPEC, {PingHappened: lambda msg, *, envelope: None})


async def test_failing_handler_is_retried_then_dead_lettered(bus: Bus):
    calls: list[int] = []

    async def flaky(msg, *, envelope):
        calls.append(msg.n)
        raise RuntimeError("backend down")

    await bus.consume(PINGS, {PingHappened: flaky})
    await bus.publish(PingHappened(n=1))
    dead = await _drain_dlq(bus, timeout=15)
    assert len(calls) == SPEC.max_attempts  # first try + one retry after the 1 s tier
    assert dead.headers["x-attempt"] == SPEC.max_attempts + 1
    assert "backend down" in str(dead.headers["x-last-error"])


async def test_transient_failure_recovers_on_retry(bus: Bus):
    seen: list[int] = []
    done = asyncio.Event()

    async def once_failing(msg, *, envelope):
        seen.append(msg.n)
        if len(seen) == 1:
            raise ConnectionError("blip")
        done.set()

    await bus.consume(PINGS, {PingHappened: once_failing})
    await bus.publish(PingHappened(n=3))
    await asyncio.wait_for(done.wait(), 10)
    assert seen == [3, 3]


async def test_poison_message_goes_to_dead_letter_queue_at_once(bus: Bus):
    handled: list = []

    async def on_ping(msg, *, envelope):
        handled.append(msg)

    await bus.consume(PINGS, {PingHappened: on_ping})
    ch = await bus.connection.channel()
    ex = await ch.get_exchange(bus.names.events)
    await ex.publish(aio_pika.Message(b"{not json", type="test.ping_happened", message_id="poison-1"),
                     routing_key=PingHappened.routing_key())
    await ex.publish(aio_pika.Message(b"{}", type="no.such_type", message_id="poison-2"),
                     routing_key=PingHappened.routing_key())
    first = await _drain_dlq(bus, timeout=5)
    second = await _drain_dlq(bus, timeout=5)
    assert {first.message_id, second.message_id} == {"poison-1", "poison-2"}
    # Rejected by the consumer, not retried: the broker's x-death says so.
    assert first.headers["x-death"][0]["reason"] == "rejected"
    assert handled == []


async def test_duplicate_message_id_is_handled_once(bus: Bus, database_url: str, pg_schema: str):
    pool = await create_pool(database_url, schema=pg_schema)
    deduper = PgDeduper(pool)
    await deduper.ensure()
    handled: list[int] = []
    done = asyncio.Event()

    async def on_ping(msg, *, envelope):
        handled.append(msg.n)
        if msg.n == 2:
            done.set()

    await bus.consume(PINGS, {PingHappened: on_ping}, deduper=deduper)
    await bus.publish(PingHappened(n=1), message_id="same-id")
    await bus.publish(PingHappened(n=1), message_id="same-id")
    await bus.publish(PingHappened(n=2))
    await asyncio.wait_for(done.wait(), 5)
    assert handled == [1, 2]
    await pool.close()


async def test_rpc_reply_error_and_timeout(bus: Bus):
    async def double(cmd, *, envelope):
        if cmd.n < 0:
            raise NotFound("negative", "no such number")
        return Doubled(n=cmd.n * 2)

    await bus.serve({Double: double})
    reply, body = await bus.call("svc", Double(n=21), expect=Doubled)
    assert reply.n == 42 and body is None
    with pytest.raises(RemoteError) as err:
        await bus.call("svc", Double(n=-1))
    assert (err.value.code, err.value.status) == ("negative", 404)
    with pytest.raises(RpcTimeout):
        await bus.call("nobody", Double(n=1), timeout=0.5)
    # Many calls in flight at once each get their own answer.
    replies = await asyncio.gather(*[bus.call("svc", Double(n=i)) for i in range(50)])
    assert [r.n for r, _ in replies] == [i * 2 for i in range(50)]


async def test_message_that_keeps_killing_its_consumer_is_dead_lettered_by_the_delivery_limit(bus: Bus, amqp_url: str):
    """A consumer that dies holding the message (no ack, connection gone) gets it again, a bounded number of times."""
    from timbre_common.messaging.topology import DELIVERY_LIMIT

    await bus.publish(PingHappened(n=13), message_id="crasher")
    deliveries = 0
    for _ in range(DELIVERY_LIMIT + 3):
        conn = await aio_pika.connect(amqp_url)
        ch = await conn.channel()
        queue = await ch.get_queue(bus.names.queue(SPEC.name))
        msg = None
        for _ in range(50):
            msg = await queue.get(fail=False, no_ack=False)
            if msg is not None:
                break
            await asyncio.sleep(0.05)
        if msg is None:
            await conn.close()
            break
        deliveries += 1
        await conn.close()  # dies without acking: the broker requeues and counts the delivery
    dead = await _drain_dlq(bus, timeout=10)
    assert dead.message_id == "crasher"
    assert dead.headers["x-death"][0]["reason"] == "delivery_limit"
    assert deliveries == DELIVERY_LIMIT + 1


async def test_concurrent_first_calls_on_a_fresh_bus_all_get_answers(bus: Bus, amqp_url: str, bus_namespace: str):
    """The reply consumer is registered once, however many calls race to be the first."""

    async def double(cmd, *, envelope):
        return Doubled(n=cmd.n * 2)

    await bus.serve({Double: double})
    fresh = await Bus(url=amqp_url, namespace=bus_namespace, service="caller", rpc_timeout=5).connect()
    try:
        replies = await asyncio.gather(*[fresh.call("svc", Double(n=i)) for i in range(20)])
        assert [r.n for r, _ in replies] == [i * 2 for i in range(20)]
        # The channel survived: later calls still work.
        reply, _ = await fresh.call("svc", Double(n=5))
        assert reply.n == 10
    finally:
        await fresh.close()


async def test_a_deduper_outage_does_not_stall_the_consumer(bus: Bus):
    """The inbox's database failing must hand the message back, not hold its prefetch slot forever."""
    from dataclasses import replace

    class FlakyDeduper:
        def __init__(self) -> None:
            self.failures, self.ids = 2, set()

        async def seen(self, consumer: str, message_id: str) -> bool:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("inbox database down")
            return message_id in self.ids

        async def remember(self, consumer: str, message_id: str) -> None:
            self.ids.add(message_id)

    handled: list[int] = []
    done = asyncio.Event()

    async def on_ping(msg, *, envelope):
        handled.append(msg.n)
        if set(handled) == {0, 1, 2}:
            done.set()

    await bus.consume(replace(PINGS, prefetch=1), {PingHappened: on_ping}, deduper=FlakyDeduper())
    for n in range(3):
        await bus.publish(PingHappened(n=n))
    await asyncio.wait_for(done.wait(), 10)
    assert sorted(handled) == [0, 1, 2]


async def test_dead_lettered_messages_are_redriven_once_the_cause_is_fixed(bus: Bus, amqp_url: str):
    """The operator's redrive moves parked messages back with fresh attempts; a fixed handler then takes them."""
    from timbre_common.redrive import depths, peek, redrive

    broken = True
    handled: list[int] = []
    done = asyncio.Event()

    async def on_ping(msg, *, envelope):
        if broken:
            raise RuntimeError("dependency down")
        handled.append(msg.n)
        done.set()

    await bus.consume(PINGS, {PingHappened: on_ping})
    await bus.publish(PingHappened(n=99), message_id="parked")
    names = bus.names
    deadline = asyncio.get_running_loop().time() + 15
    while (await depths(bus.connection, names, [SPEC])).get(SPEC.name, 0) == 0:
        assert asyncio.get_running_loop().time() < deadline, "never dead-lettered"
        await asyncio.sleep(0.2)
    [line] = await peek(bus.connection, names, SPEC.name, 5)
    assert line.startswith("parked") and "dependency down" in line
    broken = False
    assert await redrive(bus.connection, names, SPEC.name) == 1
    await asyncio.wait_for(done.wait(), 10)
    assert handled == [99] and (await depths(bus.connection, names, [SPEC]))[SPEC.name] == 0


async def test_a_database_restart_under_the_inbox_does_not_dead_letter_the_message(bus: Bus):
    """The inbox's database refusing connections for a few seconds (a restart): the message waits, in hand,
    instead of bouncing off the broker until the quorum queue's delivery limit parks it."""
    import asyncpg

    class RestartingDeduper:
        def __init__(self) -> None:
            self.down_until = asyncio.get_running_loop().time() + 3.0
            self.refusals = 0

        async def seen(self, consumer: str, message_id: str) -> bool:
            if asyncio.get_running_loop().time() < self.down_until:
                self.refusals += 1
                raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
            return False

        async def remember(self, consumer: str, message_id: str) -> None:
            pass

    deduper = RestartingDeduper()
    handled: list[int] = []
    done = asyncio.Event()

    async def on_ping(msg, *, envelope):
        handled.append(msg.n)
        done.set()

    await bus.consume(PINGS, {PingHappened: on_ping}, deduper=deduper)
    await bus.publish(PingHappened(n=9))
    await asyncio.wait_for(done.wait(), 20)
    assert handled == [9] and deduper.refusals >= 2
    ch = await bus.connection.channel()
    dlq = await ch.get_queue(bus.names.dlq(SPEC.name))
    assert await dlq.get(fail=False) is None
