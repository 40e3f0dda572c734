"""The transactional outbox against real PostgreSQL and RabbitMQ: state and its event commit together, and a
process killed between the commit and the publish loses nothing."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from typing import ClassVar

import aio_pika
import pytest

from timbre_common.contracts import Event
from timbre_common.db import create_pool
from timbre_common.messaging import Bus, OutboxBus, QueueSpec, TransactionalPool
from timbre_common.messaging.topology import delete_topology


class ThingDone(Event):
    TYPE: ClassVar[str] = "test.thing_done"
    thing: str


SPEC = QueueSpec("test.outbox", (ThingDone.routing_key(),))

# A service that commits a state change with its event, then is SIGKILLed before anything is relayed.
CRASHER = textwrap.dedent("""
    import asyncio, os, signal, sys
    from timbre_common.db import create_pool
    from timbre_common.messaging import Bus, OutboxBus, TransactionalPool
    sys.path.insert(0, sys.argv[4])
    from test_outbox import ThingDone

    async def main(db, schema, amqp, ns):
        pool = TransactionalPool(await create_pool(db, schema=schema))
        bus = await Bus(url=amqp, namespace=ns, service="crasher").connect()
        outbox = OutboxBus(bus, pool)
        async with outbox.transaction():
            await pool.execute("INSERT INTO things (name) VALUES ('from-the-dead')")
            await outbox.publish(ThingDone(thing="from-the-dead"), message_id="thing:from-the-dead")
        os.kill(os.getpid(), signal.SIGKILL)  # committed; the relay never ran

    asyncio.run(main(*sys.argv[1:4], sys.argv[5]))
""")


@pytest.fixture
async def setup(database_url: str, pg_schema: str, amqp_url: str, bus_namespace: str):
    pool = TransactionalPool(await create_pool(database_url, schema=pg_schema))
    await pool.execute("CREATE TABLE things (name text PRIMARY KEY)")
    bus = await Bus(url=amqp_url, namespace=bus_namespace, service="svc").connect(declare=[SPEC])
    outbox = OutboxBus(bus, pool, poll_s=0.2)
    await outbox.ensure()
    got: asyncio.Queue = asyncio.Queue()

    async def on_done(msg: ThingDone, *, envelope) -> None:
        await got.put((msg.thing, envelope.message_id))

    await bus.consume(SPEC, {ThingDone: on_done})
    yield pool, bus, outbox, got
    await outbox.stop()
    await bus.close()
    await pool.close()
    conn = await aio_pika.connect(amqp_url)
    await delete_topology(await conn.channel(), bus.names, services=("svc",))
    await conn.close()


async def _things(pool: TransactionalPool) -> list[str]:
    return [r["name"] for r in await pool.fetch("SELECT name FROM things ORDER BY name")]


async def test_state_and_event_commit_together_and_the_relay_publishes_with_the_same_id(setup):
    pool, _, outbox, got = setup
    async with outbox.transaction():
        await pool.execute("INSERT INTO things (name) VALUES ('a')")
        await outbox.publish(ThingDone(thing="a"), message_id="thing:a")
        # Not yet visible to anyone else, not yet published.
        assert await outbox.pending() == 0
    assert await outbox.pending() == 1
    outbox.start()
    assert await asyncio.wait_for(got.get(), 10) == ("a", "thing:a")
    await asyncio.sleep(0.3)
    assert await outbox.pending() == 0


async def test_a_rolled_back_change_announces_nothing(setup):
    pool, _, outbox, got = setup
    outbox.start()
    with pytest.raises(RuntimeError):
        async with outbox.transaction():
            await pool.execute("INSERT INTO things (name) VALUES ('b')")
            await outbox.publish(ThingDone(thing="b"))
            raise RuntimeError("handler failed half-way")
    async with outbox.transaction():
        await pool.execute("INSERT INTO things (name) VALUES ('c')")
        await outbox.publish(ThingDone(thing="c"))
    assert (await asyncio.wait_for(got.get(), 10))[0] == "c"
    assert await _things(pool) == ["c"] and got.empty()


async def test_a_crash_between_commit_and_publish_loses_nothing(setup, database_url, pg_schema, amqp_url,
                                                                bus_namespace):
    pool, _, outbox, got = setup
    here = os.path.dirname(__file__)
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", CRASHER, database_url, pg_schema,
                                                    amqp_url, here, bus_namespace], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert await _things(pool) == ["from-the-dead"]
    assert got.empty() and await outbox.pending() == 1
    outbox.start()  # the service comes back: its relay finds the event
    assert await asyncio.wait_for(got.get(), 10) == ("from-the-dead", "thing:from-the-dead")


async def test_an_unreachable_broker_keeps_events_until_it_answers(setup, database_url, pg_schema):
    pool, bus, outbox, got = setup

    class DownBus:
        async def publish(self, *args, **kwargs):
            from timbre_common.messaging import BrokerUnavailable
            raise BrokerUnavailable("down")

    down = OutboxBus(DownBus(), pool)
    async with down.transaction():
        await pool.execute("INSERT INTO things (name) VALUES ('d')")
        await down.publish(ThingDone(thing="d"))
    with pytest.raises(Exception, match="down"):
        await down.relay_once()
    assert await outbox.pending() == 1
    outbox.start()
    assert (await asyncio.wait_for(got.get(), 10))[0] == "d"
