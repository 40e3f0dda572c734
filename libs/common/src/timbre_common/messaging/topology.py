"""Exchanges and queues, declared by code. Every consumer queue is listed here, so any publisher can
declare the whole topology before it publishes and no event is dropped for want of a queue."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import aio_pika

from ..catalogue import KNOWN_BACKENDS
from ..contracts import accounts, billing, storage, synthesis, voices, webhooks

# Delays (seconds) of the retry tiers: the n-th retry waits RETRY_DELAYS[min(n, len) - 1]. With the default of
# six attempts an event survives about 35 minutes of a dependency being down before it is dead-lettered.
RETRY_DELAYS: tuple[int, ...] = (1, 5, 30, 300, 1800)
# Deliveries before the broker itself dead-letters a message that keeps crashing its consumer.
DELIVERY_LIMIT = 5
# Work orders a backend's queue holds before the broker refuses more (the publisher's confirm is negative and
# the client is told to come back later): a backlog cannot grow without bound. Every declarer of a work queue
# must pass the same value (WORK_QUEUE_MAX_LENGTH), as the broker refuses a redeclaration with other arguments.
WORK_QUEUE_MAX_LENGTH = 10_000


def _bounded(max_length: int) -> dict[str, object]:
    return {"x-max-length": max_length, "x-overflow": "reject-publish"}


@dataclass(frozen=True)
class QueueSpec:
    """A durable consumer queue bound to routing keys of the events exchange."""

    name: str
    bindings: tuple[str, ...]
    quorum: bool = True
    max_attempts: int = 6
    # Consumers on one queue share the work; prefetch bounds what one of them holds unacked.
    prefetch: int = 16
    arguments: dict[str, object] = field(default_factory=dict)


def _keys(*classes: type) -> tuple[str, ...]:
    return tuple(c.routing_key() for c in classes)  # type: ignore[attr-defined]


QUEUES: dict[str, QueueSpec] = {
    spec.name: spec
    for spec in (
        QueueSpec("storage.events", _keys(synthesis.SynthesisCompleted, voices.VoiceDeleted,
                                          storage.ObjectsReleased, accounts.AccountPurgeRequested)),
        QueueSpec("dispatcher.events", _keys(storage.AudioStored, synthesis.SynthesisFailed, storage.ObjectsExpired,
                                             voices.VoiceDeleted, accounts.AccountPurgeRequested)),
        QueueSpec("voices.events", _keys(voices.VoiceProfiled, accounts.AccountPurgeRequested)),
        QueueSpec("billing.events", _keys(synthesis.JobReady, synthesis.JobFailed,
                                          accounts.AccountPurgeRequested)),
        QueueSpec("gateway.events", _keys(accounts.AccountPurged, billing.AccountProvisioningRequested,
                                          billing.AccountKeysRevoked, billing.AccountKeysRestored,
                                          accounts.AccountPurgeRequested)),
        # Client webhooks (gateway): the events they announce, and the deliveries' own schedule, which hops
        # through the retry tiers above until each attempt is due.
        QueueSpec("gateway.webhook_events", _keys(synthesis.JobReady, synthesis.JobFailed, voices.VoiceDeleted)),
        QueueSpec("gateway.webhook_deliveries", _keys(webhooks.WebhookDeliveryDue), prefetch=64),
    )
}
def handler_table_problems(spec: QueueSpec, handled: Iterable[type]) -> list[str]:
    """A consumer's handler table against its queue's bindings: a bound message nobody handles would go to the
    dead letters on every delivery, and a handler nothing is bound to would never run. Empty when they match.
    A binding under a message's key with a suffix (work orders and registrations, by backend) is that message."""
    keys = [(cls, cls.routing_key()) for cls in handled]  # type: ignore[attr-defined]

    def covers(key: str, binding: str) -> bool:
        return binding == key or binding.startswith(key + ".")

    problems = [f"{spec.name}: messages bound by {b!r} have no handler"
                for b in spec.bindings if not any(covers(k, b) for _, k in keys)]
    problems += [f"{spec.name}: the handler of {cls.TYPE} v{cls.VERSION} has no binding"  # type: ignore[attr-defined]
                 for cls, k in keys if not any(covers(k, b) for b in spec.bindings)]
    return problems


def voice_profile_routing_key(backend: str) -> str:
    """Registrations are routed by the voice's backend, like work orders."""
    return f"{voices.VoiceRegistered.routing_key()}.{backend}"


def voice_profile_queue(backend: str) -> QueueSpec:
    """Registrations for the local workers of one backend, declared by those workers only: where a backend
    runs elsewhere (Modal), nothing piles up, and the backend profiles the voice on its first job instead."""
    return QueueSpec(f"gpu_worker.voice_profiles.{backend}", (voice_profile_routing_key(backend),), prefetch=2,
                     max_attempts=3)


def work_routing_key(backend: str) -> str:
    """Work orders are routed by backend, so a worker only ever receives jobs it can run."""
    return f"{synthesis.SynthesisRequested.routing_key()}.{backend}"


def local_work_queue(backend: str, max_length: int = WORK_QUEUE_MAX_LENGTH) -> QueueSpec:
    """The queue local GPU workers running `backend` share; full, it refuses new work orders."""
    return QueueSpec(f"gpu_worker.synthesis.{backend}", (work_routing_key(backend),), prefetch=8, max_attempts=3,
                     arguments=_bounded(max_length))


def modal_executor_queue(backends: list[str] | tuple[str, ...],
                         max_length: int = WORK_QUEUE_MAX_LENGTH) -> QueueSpec:
    """The queue the dispatcher drains to spawn Modal calls for the backends routed to Modal."""
    return QueueSpec("dispatcher.modal_executor", tuple(work_routing_key(b) for b in backends), prefetch=8,
                     max_attempts=5, arguments=_bounded(max_length))


class Names:
    """Broker names under one namespace (a deployment, or one test run)."""

    def __init__(self, namespace: str) -> None:
        self.ns = namespace

    @property
    def events(self) -> str:
        return f"{self.ns}.events"

    @property
    def dead_letters(self) -> str:
        return f"{self.ns}.dlx"

    @property
    def retries(self) -> str:
        return f"{self.ns}.retry"

    def queue(self, name: str) -> str:
        return f"{self.ns}.{name}"

    def dlq(self, name: str) -> str:
        return f"{self.ns}.{name}.dlq"

    def retry_queue(self, name: str, delay: int) -> str:
        return f"{self.ns}.{name}.retry.{delay}s"

    def stream_queue(self, instance: str) -> str:
        """The queue of one gateway instance that receives the audio pieces of the streams it relays."""
        return f"{self.ns}.gateway.stream.{instance}"

    def rpc_queue(self, service: str) -> str:
        return f"{self.ns}.rpc.{service}"


async def declare_exchanges(channel: aio_pika.abc.AbstractChannel, names: Names) -> aio_pika.abc.AbstractExchange:
    """The events (topic), dead-letter (direct) and retry (direct) exchanges; returns events."""
    events = await channel.declare_exchange(names.events, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(names.dead_letters, aio_pika.ExchangeType.DIRECT, durable=True)
    await channel.declare_exchange(names.retries, aio_pika.ExchangeType.DIRECT, durable=True)
    return events


async def declare_queue(channel: aio_pika.abc.AbstractChannel, names: Names,
                        spec: QueueSpec) -> aio_pika.abc.AbstractQueue:
    """A consumer queue with its dead-letter queue and its retry tiers."""
    qname = names.queue(spec.name)
    args: dict[str, object] = {
        "x-dead-letter-exchange": names.dead_letters,
        "x-dead-letter-routing-key": qname,
        **spec.arguments,
    }
    if spec.quorum:
        args["x-queue-type"] = "quorum"
        # Set explicitly: newer brokers default to 20, and a crash loop must end sooner.
        args["x-delivery-limit"] = DELIVERY_LIMIT
    queue = await channel.declare_queue(qname, durable=True, arguments=args)
    for key in spec.bindings:
        await queue.bind(names.events, routing_key=key)
    dlq = await channel.declare_queue(names.dlq(spec.name), durable=True, arguments={"x-queue-type": "quorum"})
    await dlq.bind(names.dead_letters, routing_key=qname)
    for delay in RETRY_DELAYS:
        rq_name = names.retry_queue(spec.name, delay)
        # A message waits here `delay` seconds, then dead-letters back to its queue by the default exchange.
        rq = await channel.declare_queue(rq_name, durable=True, arguments={
            "x-message-ttl": delay * 1000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": qname,
        })
        await rq.bind(names.retries, routing_key=rq_name)
    return queue


async def declare_topology(channel: aio_pika.abc.AbstractChannel, names: Names,
                           specs: list[QueueSpec] | None = None) -> None:
    """Everything: exchanges and every consumer queue (idempotent)."""
    await declare_exchanges(channel, names)
    for spec in specs if specs is not None else QUEUES.values():
        await declare_queue(channel, names, spec)


async def ensure_topology(connection: aio_pika.abc.AbstractConnection, names: Names,
                          specs: list[QueueSpec] | None = None) -> list[str]:
    """Declare only what is missing (returns the queues declared now). A service whose broker user may configure
    its own queues only (deploy/provision.py) then starts against a topology provisioned beforehand, while one with
    every right (`make up`, the tests) declares the whole topology on its first start."""
    probes: list[aio_pika.abc.AbstractChannel] = [await connection.channel()]

    async def exists(kind: str, name: str) -> bool:
        # A passive declare needs no configure right; a miss (404) closes the channel, so the next probe opens one.
        try:
            if kind == "exchange":
                await probes[-1].get_exchange(name, ensure=True)
            else:
                await probes[-1].get_queue(name, ensure=True)
            return True
        except aio_pika.exceptions.ChannelNotFoundEntity:
            probes.append(await connection.channel())
            return False

    declared: list[str] = []
    channel = await connection.channel()
    try:
        present = [await exists("exchange", n) for n in (names.events, names.dead_letters, names.retries)]
        if not all(present):
            await declare_exchanges(channel, names)
        for spec in specs if specs is not None else QUEUES.values():
            # declare_queue makes the queue, its DLQ, then its retry tiers: the last tier stands for all of them.
            last = names.retry_queue(spec.name, RETRY_DELAYS[-1])
            if not (await exists("queue", names.queue(spec.name)) and await exists("queue", last)):
                await declare_queue(channel, names, spec)
                declared.append(spec.name)
    finally:
        for ch in (*probes, channel):
            if not ch.is_closed:
                await ch.close()
    return declared


RPC_SERVICES: tuple[str, ...] = ("gateway", "voices", "dispatcher", "storage", "billing")


async def delete_topology(channel: aio_pika.abc.AbstractChannel, names: Names,
                          services: tuple[str, ...] = RPC_SERVICES) -> None:
    """Remove every queue and exchange of a namespace (test runs clean up after themselves)."""
    for spec in [*QUEUES.values(), *(local_work_queue(b) for b in KNOWN_BACKENDS),
                 *(voice_profile_queue(b) for b in KNOWN_BACKENDS), modal_executor_queue(())]:
        for queue in (names.queue(spec.name), names.dlq(spec.name),
                      *(names.retry_queue(spec.name, d) for d in RETRY_DELAYS)):
            await channel.queue_delete(queue)
    for service in services:
        await channel.queue_delete(names.rpc_queue(service))
    for exchange in (names.events, names.dead_letters, names.retries):
        await channel.exchange_delete(exchange)
