"""Bounds against the real broker and database: a full work queue refuses publishes, inboxes are pruned."""
from __future__ import annotations

import aio_pika
import pytest

from timbre_common.contracts.synthesis import SynthesisRequested
from timbre_common.db import create_pool
from timbre_common.messaging import Bus, PgDeduper, PublishRefused, local_work_queue, work_routing_key
from timbre_common.messaging.topology import RETRY_DELAYS, Names


def _order(n: int) -> SynthesisRequested:
    return SynthesisRequested(job_id=f"j{n}", account_id="a", voice_id="v", text="Hi.", lang="en",
                              backend="embedded", cache_key="k")


@pytest.fixture
async def bounded_bus(amqp_url: str, bus_namespace: str):
    spec = local_work_queue("embedded", max_length=3)
    bus = await Bus(url=amqp_url, namespace=bus_namespace, service="dispatcher", rpc_timeout=5).connect(
        declare=[spec])
    yield bus, spec
    await bus.close()
    conn = await aio_pika.connect(amqp_url)
    channel = await conn.channel()
    names = Names(bus_namespace)
    from timbre_common.messaging import QUEUES

    for s in [*QUEUES.values(), spec]:
        for queue in (names.queue(s.name), names.dlq(s.name), *(names.retry_queue(s.name, d) for d in RETRY_DELAYS)):
            await channel.queue_delete(queue)
    for exchange in (names.events, names.dead_letters, names.retries):
        await channel.exchange_delete(exchange)
    await conn.close()


async def test_a_full_work_queue_refuses_the_next_work_order(bounded_bus) -> None:
    bus, spec = bounded_bus
    accepted = 0
    with pytest.raises(PublishRefused):
        for n in range(10):
            await bus.publish(_order(n), routing_key=work_routing_key("embedded"))
            accepted += 1
    # A quorum queue enforces its limit once it is reached (it may take one more): refused, never dropped.
    assert 3 <= accepted <= 4
    channel = await bus.connection.channel()
    queue = await channel.declare_queue(bus.names.queue(spec.name), passive=True)
    assert queue.declaration_result.message_count == accepted
    # Other events still flow while the work queue is full.
    await bus.publish(_order(4), routing_key="nobody.listens.here")
    await channel.close()


async def test_the_inbox_forgets_message_ids_past_its_retention(database_url: str, pg_schema: str) -> None:
    pool = await create_pool(database_url, schema=pg_schema)
    try:
        deduper = PgDeduper(pool, retention_s=3600)
        await deduper.ensure()
        await deduper.remember("c", "old")
        await pool.execute("UPDATE inbox SET handled_at = now() - interval '2 hours' WHERE message_id = 'old'")
        await deduper.remember("c", "new")
        assert await deduper.prune() == 1
        assert not await deduper.seen("c", "old") and await deduper.seen("c", "new")
        # Remembering prunes on its own, at most once per interval.
        await pool.execute("UPDATE inbox SET handled_at = now() - interval '2 hours'")
        fresh = PgDeduper(pool, retention_s=3600, prune_every_s=3600)
        await fresh.remember("c", "newest")
        assert await pool.fetchval("SELECT count(*) FROM inbox") == 1
    finally:
        await pool.close()
