"""Metrics and trace context across the real broker: RPC and events carry one trace, counters move."""
from __future__ import annotations

import asyncio
from typing import ClassVar

import aio_pika
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from timbre_common import tracing
from timbre_common.contracts import Command, Event, Reply
from timbre_common.messaging import RETRY_DELAYS, Bus, Names, QueueSpec


class Traced(Event):
    TYPE: ClassVar[str] = "test.obs_traced"
    n: int


class Ask(Command):
    TYPE: ClassVar[str] = "test.obs_ask"
    n: int


class Answer(Reply):
    TYPE: ClassVar[str] = "test.obs_answer"
    n: int


SPEC = QueueSpec("test.obs", (Traced.routing_key(),), max_attempts=2)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.configure("svc", exporter=exporter, env={})
    yield exporter
    tracing.shutdown()


@pytest.fixture
async def bus(amqp_url: str, bus_namespace: str):
    b = await Bus(url=amqp_url, namespace=bus_namespace, service="svc", rpc_timeout=5).connect(declare=[SPEC])
    yield b
    await b.close()
    conn = await aio_pika.connect(amqp_url)
    ch = await conn.channel()
    names = Names(bus_namespace)
    from timbre_common.messaging.topology import delete_topology

    for q in [names.queue(SPEC.name), names.dlq(SPEC.name), *[names.retry_queue(SPEC.name, d) for d in RETRY_DELAYS]]:
        await ch.queue_delete(q)
    await ch.queue_delete(names.rpc_queue("svc"))
    await delete_topology(ch, names, services=())
    await conn.close()


async def test_one_trace_from_a_call_through_its_event_and_the_counters_move(bus: Bus, spans: InMemorySpanExporter):
    got: asyncio.Queue = asyncio.Queue()

    async def on_ask(cmd: Ask, *, envelope):
        await bus.publish(Traced(n=cmd.n))
        return Answer(n=cmd.n * 2)

    async def on_traced(event: Traced, *, envelope):
        await got.put(tracing.current_trace_id())

    await bus.serve({Ask: on_ask})
    await bus.consume(SPEC, {Traced: on_traced})
    rpc_before = sample("timbre_rpc_client_duration_seconds_count", target="svc", command=Ask.TYPE, outcome="ok")
    handled_before = sample("timbre_messages_handled_total", queue=SPEC.name, type=Traced.TYPE)

    with tracing.span("root"):
        root_trace = tracing.current_trace_id()
        answer, _ = await bus.call("svc", Ask(n=21), expect=Answer)
    assert answer.n == 42
    consumer_trace = await asyncio.wait_for(got.get(), 10)
    for _ in range(50):  # the consumer span ends just after the handler returns
        if any(s.name == f"{SPEC.name} process" for s in spans.get_finished_spans()):
            break
        await asyncio.sleep(0.05)

    assert consumer_trace == root_trace
    by_name = {s.name: s for s in spans.get_finished_spans()}
    client = next(s for s in spans.get_finished_spans() if s.name == f"svc {Ask.TYPE}" and s.kind.name == "CLIENT")
    server = next(s for s in spans.get_finished_spans() if s.name == f"svc {Ask.TYPE}" and s.kind.name == "SERVER")
    producer = by_name[f"{Traced.routing_key()} publish"]
    consumer = by_name[f"{SPEC.name} process"]
    # Each hop is the child of the one before it, all under the root's trace id.
    assert client.parent.span_id == by_name["root"].context.span_id
    assert server.parent.span_id == client.context.span_id
    assert producer.parent.span_id == server.context.span_id
    assert consumer.parent.span_id == producer.context.span_id
    assert {format(s.context.trace_id, "032x") for s in (client, server, producer, consumer)} == {root_trace}

    assert sample("timbre_rpc_client_duration_seconds_count", target="svc", command=Ask.TYPE,
                  outcome="ok") == rpc_before + 1
    assert sample("timbre_messages_handled_total", queue=SPEC.name, type=Traced.TYPE) == handled_before + 1


async def test_a_failing_handler_counts_a_retry_then_a_dead_letter(bus: Bus):
    async def on_traced(event: Traced, *, envelope):
        raise RuntimeError("always")

    retried = sample("timbre_messages_retried_total", queue=SPEC.name, type=Traced.TYPE)
    parked = sample("timbre_messages_dead_lettered_total", queue=SPEC.name, reason="attempts")
    await bus.consume(SPEC, {Traced: on_traced})
    await bus.publish(Traced(n=1))
    for _ in range(200):  # one retry after 1 s, then (max_attempts=2) the dead-letter queue
        if sample("timbre_messages_dead_lettered_total", queue=SPEC.name, reason="attempts") > parked:
            break
        await asyncio.sleep(0.05)
    assert sample("timbre_messages_retried_total", queue=SPEC.name, type=Traced.TYPE) == retried + 1
    assert sample("timbre_messages_dead_lettered_total", queue=SPEC.name, reason="attempts") == parked + 1


async def test_queue_poll_reads_depths_consumers_and_dead_letters(bus: Bus):
    from timbre_common import metrics

    await bus.publish(Traced(n=1))
    await bus.publish(Traced(n=2))
    for _ in range(50):
        await metrics.poll_queues(bus.connection, bus.names, [SPEC, QueueSpec("test.obs_missing", ())])
        if sample("timbre_queue_messages", queue=SPEC.name) == 2:
            break
        await asyncio.sleep(0.1)
    assert sample("timbre_queue_messages", queue=SPEC.name) == 2
    assert sample("timbre_queue_consumers", queue=SPEC.name) == 0
    assert sample("timbre_dead_letter_messages", queue=SPEC.name) == 0
    # A queue nobody declared is skipped, not reported as empty.
    assert REGISTRY.get_sample_value("timbre_queue_messages", {"queue": "test.obs_missing"}) is None


async def test_rpc_outcomes_are_told_apart(bus: Bus):
    from timbre_common.messaging import NotFound, RemoteError, RpcTimeout

    async def on_ask(cmd: Ask, *, envelope):
        if cmd.n < 0:
            raise NotFound("nothing", "no such thing")
        raise RuntimeError("broken")

    await bus.serve({Ask: on_ask})
    labels = {"target": "svc", "command": Ask.TYPE}
    refused = sample("timbre_rpc_client_duration_seconds_count", outcome="refused", **labels)
    failed = sample("timbre_rpc_client_duration_seconds_count", outcome="error", **labels)
    timed_out = sample("timbre_rpc_client_duration_seconds_count", target="nobody", command=Ask.TYPE,
                       outcome="timeout")
    with pytest.raises(RemoteError):
        await bus.call("svc", Ask(n=-1))
    with pytest.raises(RemoteError):
        await bus.call("svc", Ask(n=1))
    with pytest.raises(RpcTimeout):
        await bus.call("nobody", Ask(n=1), timeout=0.3)
    assert sample("timbre_rpc_client_duration_seconds_count", outcome="refused", **labels) == refused + 1
    assert sample("timbre_rpc_client_duration_seconds_count", outcome="error", **labels) == failed + 1
    assert sample("timbre_rpc_client_duration_seconds_count", target="nobody", command=Ask.TYPE,
                  outcome="timeout") == timed_out + 1
    assert sample("timbre_rpc_server_duration_seconds_count", command=Ask.TYPE, outcome="refused") >= 1
    assert sample("timbre_rpc_server_duration_seconds_count", command=Ask.TYPE, outcome="error") >= 1
