"""One service's connection to the broker: publisher with confirms, consumers, RPC."""
from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
from aiormq.exceptions import DeliveryError
from pamqp.commands import Basic

from ..contracts import Command, Event, Message
from ..logging import correlation_id_var, get_logger
from . import instrument
from .codec import decode, encode, envelope_for
from .consumer import Consumer, Deduper, Handler
from .rpc import BROKER_ERRORS, UNAVAILABLE_WAIT_S, BrokerUnavailable, RpcClient, RpcHandler, RpcServer
from .topology import QUEUES, Names, QueueSpec, ensure_topology, handler_table_problems

log = get_logger(__name__)


# A publish whose confirm has not come by then is reported as failed (the broker is not answering).
PUBLISH_TIMEOUT_S = 30.0
# Seconds between reconnect attempts while the broker is away (aio-pika's default is 5).
RECONNECT_INTERVAL_S = 1.0


def connection_url(url: str, name: str) -> str:
    """`url` with the connection's name and reconnect interval, unless it names them itself.

    aio-pika ignores `client_properties` when given a URL: only the URL's `name` reaches the broker.
    """
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("name", name)
    query.setdefault("reconnect_interval", str(RECONNECT_INTERVAL_S))
    return urlunsplit(parts._replace(query=urlencode(query)))


class PublishRefused(Exception):
    """The broker refused the message (negative confirm): a queue it routes to is full (`reject-publish`)."""


class Bus:
    """Owns the connection; everything is created in `connect`, nothing at import."""

    def __init__(self, *, url: str, namespace: str, service: str, rpc_timeout: float = 30.0) -> None:
        self.url = url
        self.names = Names(namespace)
        self.service = service
        self.rpc_timeout = rpc_timeout
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._publish_channel: aio_pika.abc.AbstractChannel | None = None
        self._events: aio_pika.abc.AbstractExchange | None = None
        self._rpc: RpcClient | None = None
        self._rpc_lock = asyncio.Lock()
        self._direct_channel: aio_pika.abc.AbstractChannel | None = None
        self._consumers: list[Consumer] = []
        self._servers: list[RpcServer] = []

    @property
    def connection_name(self) -> str:
        """The name the broker shows for this connection (`rabbitmqctl list_connections client_properties`)."""
        return f"{self.names.ns}.{self.service}"

    async def connect(self, *, declare: list[QueueSpec] | None = None) -> Bus:
        """Connect and make sure the topology exists (every queue of QUEUES, plus `declare`): what is missing is
        declared, what exists is left alone, so a broker user limited to its own queues starts once the topology
        was provisioned."""
        self.connection = await aio_pika.connect_robust(connection_url(self.url, self.connection_name))
        await ensure_topology(self.connection, self.names, [*QUEUES.values(), *(declare or [])])
        self._publish_channel = await self.connection.channel(publisher_confirms=True)
        self._events = await self._publish_channel.get_exchange(self.names.events, ensure=False)
        return self

    async def close(self) -> None:
        """Stop consuming, let in-flight handlers finish, then close the connection."""
        # All at once: a shutdown waits for the slowest handler, not for the sum of them.
        await asyncio.gather(*(server.stop() for server in self._servers),
                             *(consumer.stop() for consumer in self._consumers), return_exceptions=True)
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    async def publish(self, event: Event, *, body: bytes | None = None, account_id: str | None = None,
                      message_id: str | None = None, correlation_id: str | None = None,
                      routing_key: str | None = None) -> str:
        """Publish an event and wait for the broker's confirm; returns the message id."""
        assert self._events is not None, "Bus.connect() first"
        envelope = envelope_for(event, correlation_id=correlation_id or correlation_id_var.get(),
                                account_id=account_id or getattr(event, "account_id", None), message_id=message_id)
        # Not mandatory: every consumer's queue is declared up front, and an event nobody subscribes to (yet) is
        # meant to go nowhere, not to come back and be logged whole by the client library.
        await self.wait_connected()
        with instrument.publishing(routing_key or event.routing_key(), envelope.message_id):
            message = encode(event, envelope, body=body)
            try:
                confirmation = await asyncio.wait_for(
                    self._events.publish(message, routing_key=routing_key or event.routing_key(), mandatory=False),
                    PUBLISH_TIMEOUT_S)
            except DeliveryError as exc:  # a negative confirm
                raise PublishRefused(f"the broker refused {event.TYPE} (a queue it routes to is full)") from exc
            except (TimeoutError, *BROKER_ERRORS) as exc:
                raise BrokerUnavailable(f"could not publish {event.TYPE}: {type(exc).__name__}: {exc}") from exc
            if isinstance(confirmation, Basic.Nack):
                raise PublishRefused(f"the broker refused {event.TYPE} (a queue it routes to is full)")
        log.debug("event_published", type=event.TYPE, message_id=envelope.message_id)
        return envelope.message_id

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now (it reconnects by itself when it is not)."""
        return self.connection is not None and self.connection.connected.is_set() and not self.connection.is_closed

    async def wait_connected(self, timeout: float = UNAVAILABLE_WAIT_S) -> None:
        """Return once connected; BrokerUnavailable if the broker stays away `timeout` seconds."""
        assert self.connection is not None, "Bus.connect() first"
        if self.connected:
            return
        try:
            await asyncio.wait_for(self.connection.connected.wait(), timeout)
        except TimeoutError as exc:
            raise BrokerUnavailable("the broker connection is down; retry shortly") from exc

    async def consume(self, spec: QueueSpec, handlers: dict[type[Message], Handler], *,
                      deduper: Deduper | None = None) -> Consumer:
        """Start consuming `spec`'s queue on a channel of its own; the handler table must match its bindings."""
        if problems := handler_table_problems(spec, handlers):
            raise ValueError("handler table does not match the topology: " + "; ".join(problems))
        assert self.connection is not None, "Bus.connect() first"
        channel = await self.connection.channel(publisher_confirms=True)
        consumer = Consumer(names=self.names, spec=spec, handlers=handlers, channel=channel, deduper=deduper)
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def serve(self, handlers: dict[type[Command], RpcHandler], *, prefetch: int = 32) -> RpcServer:
        """Answer this service's RPC queue."""
        assert self.connection is not None, "Bus.connect() first"
        # Replies need no publisher confirms: the caller's wait for the reply is the confirmation.
        channel = await self.connection.channel(publisher_confirms=False)
        server = RpcServer(names=self.names, service=self.service, handlers=handlers, channel=channel,
                           prefetch=prefetch)
        await server.start()
        self._servers.append(server)
        return server

    async def subscribe(self, event_types: list[type[Event]], handler: Handler,
                        routing_keys: tuple[str, ...] = ()) -> None:
        """Fan-out for live state (heartbeats, read models): a private queue that dies with the connection, no
        retries. `routing_keys` adds bindings (topic patterns) for events routed under keys of their own."""
        assert self.connection is not None, "Bus.connect() first"
        channel = await self.connection.channel(publisher_confirms=False)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True, arguments={"x-message-ttl": 60_000})
        for routing_key in (*(cls.routing_key() for cls in event_types), *routing_keys):
            await queue.bind(self.names.events, routing_key=routing_key)

        async def on_message(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
            try:
                msg, envelope, _ = decode(incoming)
                await handler(msg, envelope=envelope)
            except Exception as exc:  # live state: a bad beat is dropped, the next one will do
                log.warning("subscription_message_dropped", error=str(exc))

        await queue.consume(on_message, no_ack=True)

    async def send(self, queue: str, message: Message, *, body: bytes | None = None,
                   account_id: str | None = None) -> None:
        """Send straight to one named queue (a gateway instance's stream queue): no confirm, not persisted.

        For live data whose reader is one process: if that queue is gone (the process died), the message is
        dropped, which is what its reader would want.
        """
        assert self.connection is not None, "Bus.connect() first"
        if self._direct_channel is None:
            self._direct_channel = await self.connection.channel(publisher_confirms=False)
        envelope = envelope_for(message, correlation_id=correlation_id_var.get(),
                                account_id=account_id or getattr(message, "account_id", None))
        out = encode(message, envelope, body=body)
        out.delivery_mode = aio_pika.DeliveryMode.NOT_PERSISTENT
        await self._direct_channel.default_exchange.publish(out, routing_key=queue, mandatory=False)

    async def open_inbox(self, queue: str, handler: Handler) -> None:
        """Consume a queue private to this process, by name (exclusive, gone with the connection): the
        counterpart of `send`. Messages are taken without ack; one that fails to decode is dropped."""
        assert self.connection is not None, "Bus.connect() first"
        channel = await self.connection.channel(publisher_confirms=False)
        inbox = await channel.declare_queue(queue, exclusive=True, auto_delete=True,
                                            arguments={"x-message-ttl": 60_000})

        async def on_message(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
            try:
                msg, envelope, body = decode(incoming)
                await handler(msg, envelope=envelope, body=body)
            except Exception as exc:  # live data: a bad piece is dropped; its reader notices the gap
                log.warning("inbox_message_dropped", queue=queue, error=str(exc))

        await inbox.consume(on_message, no_ack=True)

    @property
    async def rpc(self) -> RpcClient:
        """The RPC client (one channel, created on first use, once even under concurrent first calls)."""
        if self._rpc is not None:
            return self._rpc
        async with self._rpc_lock:
            if self._rpc is None:
                assert self.connection is not None, "Bus.connect() first"
                # No publisher confirms on requests: a lost request ends in the caller's timeout.
                channel = await self.connection.channel(publisher_confirms=False)
                client = RpcClient(names=self.names, channel=channel, timeout=self.rpc_timeout)
                await client.start()
                self._rpc = client
        return self._rpc

    async def call(self, service: str, command: Command, **kwargs: Any) -> Any:
        """Shorthand for `(await bus.rpc).call(...)`."""
        client = await self.rpc
        with instrument.rpc_call(service, command.TYPE):
            return await client.call(service, command, **kwargs)


class PgDeduper:
    """Message ids already handled, kept in the service's own schema (table `inbox`) for `retention_s`.

    Past the retention a message id is forgotten: far longer than any redelivery or retry tier takes (a parked
    message redriven later than that is handled again, and every handler is idempotent). Pruned by whoever
    remembers, at most once per `prune_every_s`.
    """

    DDL = ("CREATE TABLE IF NOT EXISTS inbox (consumer text NOT NULL, message_id text NOT NULL, "
           "handled_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (consumer, message_id))")
    INDEX = "CREATE INDEX IF NOT EXISTS inbox_handled_at ON inbox (handled_at)"

    def __init__(self, pool: Any, *, retention_s: float = 7 * 24 * 3600, prune_every_s: float = 3600) -> None:
        self.pool = pool
        self.retention_s = retention_s
        self.prune_every_s = prune_every_s
        self._next_prune = 0.0

    async def ensure(self) -> None:
        await self.pool.execute(self.DDL)
        await self.pool.execute(self.INDEX)

    async def seen(self, consumer: str, message_id: str) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT 1 FROM inbox WHERE consumer = $1 AND message_id = $2", consumer, message_id))

    async def remember(self, consumer: str, message_id: str) -> None:
        await self.pool.execute(
            "INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", consumer, message_id)
        now = asyncio.get_running_loop().time()
        if now >= self._next_prune:
            self._next_prune = now + self.prune_every_s
            try:
                pruned = await self.prune()
            except Exception as exc:  # noqa: BLE001 - pruning is housekeeping; the message was handled
                log.warning("inbox_prune_failed", error=type(exc).__name__)
            else:
                if pruned:
                    log.info("inbox_pruned", rows=pruned)

    async def prune(self, limit: int = 10_000) -> int:
        """Forget up to `limit` message ids older than the retention; how many went."""
        status = await self.pool.execute(
            "DELETE FROM inbox WHERE ctid IN (SELECT ctid FROM inbox WHERE handled_at < now() - "
            "make_interval(secs => $1) LIMIT $2)", float(self.retention_s), limit)
        return int(status.split()[-1])
