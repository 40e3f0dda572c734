"""Dead-letter queues for operators: how deep each is, and moving their messages back once the cause is fixed.

    python -m timbre_common.redrive              # depth of every dead-letter queue of BUS_NAMESPACE
    python -m timbre_common.redrive storage.events [--limit 100]   # move them back to their queue

A message moved back starts its attempts afresh (its `x-attempt` is dropped) and carries `x-redriven` (how
many times an operator has moved it). Consumers are idempotent, so a message that had in fact been handled
is harmless. Undecodable messages come back as undecodable: look at them (`--peek`) before moving them.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

import aio_pika

from .catalogue import KNOWN_BACKENDS
from .messaging.consumer import ATTEMPT_HEADER
from .messaging.topology import QUEUES, Names, QueueSpec, local_work_queue, modal_executor_queue, voice_profile_queue
from .settings import CommonSettings


def consumer_queues() -> list[QueueSpec]:
    """Every queue that has a dead-letter queue."""
    return [*QUEUES.values(), *(local_work_queue(b) for b in KNOWN_BACKENDS),
            *(voice_profile_queue(b) for b in KNOWN_BACKENDS), modal_executor_queue(())]


async def depths(connection: aio_pika.abc.AbstractConnection, names: Names,
                 specs: list[QueueSpec] | None = None) -> dict[str, int]:
    """Messages waiting in each existing dead-letter queue (of `specs`, by default every consumer queue)."""
    out: dict[str, int] = {}
    for spec in specs if specs is not None else consumer_queues():
        # A passive declare of a missing queue closes its channel: one short-lived channel per queue.
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(names.dlq(spec.name), passive=True)
            out[spec.name] = queue.declaration_result.message_count or 0
        except aio_pika.exceptions.ChannelClosed:
            continue
        finally:
            if not channel.is_closed:
                await channel.close()
    return out


async def redrive(connection: aio_pika.abc.AbstractConnection, names: Names, queue_name: str, *,
                  limit: int | None = None) -> int:
    """Move up to `limit` messages from `queue_name`'s dead-letter queue back to it; returns how many moved."""
    channel = await connection.channel(publisher_confirms=True)
    dlq = await channel.get_queue(names.dlq(queue_name), ensure=True)
    moved = 0
    while limit is None or moved < limit:
        incoming = await dlq.get(fail=False, no_ack=False)
        if incoming is None:
            break
        headers = {k: v for k, v in (incoming.headers or {}).items() if k not in (ATTEMPT_HEADER, "x-death")}
        headers["x-redriven"] = int(headers.get("x-redriven", 0) or 0) + 1  # type: ignore[arg-type]
        copy = aio_pika.Message(
            bytes(incoming.body), message_id=incoming.message_id, type=incoming.type,
            correlation_id=incoming.correlation_id, content_type=incoming.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, timestamp=incoming.timestamp, headers=headers)
        # Confirmed on the main queue before it leaves the dead-letter queue: never lost, at worst twice.
        await channel.default_exchange.publish(copy, routing_key=names.queue(queue_name))
        await incoming.ack()
        moved += 1
    await channel.close()
    return moved


async def peek(connection: aio_pika.abc.AbstractConnection, names: Names, queue_name: str, count: int) -> list[str]:
    """A line per message at the head of a dead-letter queue (left in place)."""
    channel = await connection.channel()
    dlq = await channel.get_queue(names.dlq(queue_name), ensure=True)
    lines = []
    for _ in range(count):
        incoming = await dlq.get(fail=False, no_ack=False)
        if incoming is None:
            break
        headers = incoming.headers or {}
        lines.append(f"{incoming.message_id} type={incoming.type} attempts={headers.get(ATTEMPT_HEADER, 1)} "
                     f"last_error={str(headers.get('x-last-error', ''))[:200]!r}")
    await channel.close()  # unacked messages go back to the queue, in order
    return lines


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("queue", nargs="?", help="a consumer queue, e.g. storage.events (without the namespace)")
    parser.add_argument("--limit", type=int, default=None, help="move at most this many")
    parser.add_argument("--peek", type=int, default=0, help="show this many messages instead of moving them")
    args = parser.parse_args(argv)
    settings = CommonSettings()
    names = Names(settings.bus_namespace)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        if args.queue is None:
            for name, depth in (await depths(connection, names)).items():
                print(f"{depth:8d}  {names.dlq(name)}")
            return 0
        if args.queue not in {spec.name for spec in consumer_queues()}:
            print(f"unknown queue {args.queue!r}", file=sys.stderr)
            return 2
        if args.peek:
            print("\n".join(await peek(connection, names, args.queue, args.peek)) or "(empty)")
            return 0
        moved = await redrive(connection, names, args.queue, limit=args.limit)
        print(f"moved {moved} message(s) from {names.dlq(args.queue)} back to {names.queue(args.queue)}")
        return 0
    finally:
        await connection.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
