"""Request/reply over RabbitMQ's direct reply-to, with a timeout and typed remote errors."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import aio_pika.exceptions

from ..availability import unavailable_dependency
from ..contracts import Ack, Command, ErrorReply, Message, Ping, Reply
from ..logging import correlation, correlation_id_var, get_logger
from . import instrument
from .codec import UndecodableMessage, decode, encode, envelope_for
from .topology import Names

log = get_logger(__name__)

REPLY_TO = "amq.rabbitmq.reply-to"
# How long a call or a publish waits for a reconnecting broker before it gives up as unavailable.
UNAVAILABLE_WAIT_S = 5.0
# What aio-pika raises when the connection or channel is gone (ChannelInvalidStateError is a RuntimeError).
BROKER_ERRORS: tuple[type[BaseException], ...] = (aio_pika.exceptions.AMQPError, ConnectionError,
                                                  RuntimeError)
R = TypeVar("R", bound=Reply)
RpcHandler = Callable[..., Awaitable[Any]]


class RpcError(Exception):
    """A refusal a handler raises on purpose: travels to the caller as an ErrorReply."""

    status = 400

    def __init__(self, code: str, message: str, *, status: int | None = None, details: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        if status is not None:
            self.status = status
        self.details = details or {}


class NotFound(RpcError):
    status = 404


class Conflict(RpcError):
    status = 409


class Invalid(RpcError):
    status = 422


class RemoteError(RpcError):
    """The caller's side of an ErrorReply."""


class RpcTimeout(Exception):
    """No reply in time: the remote service is down or overloaded."""


class BrokerUnavailable(Exception):
    """The broker cannot be reached right now (the connection is down or reconnecting): retry later."""


class RpcServer:
    """Serves one service's commands from its RPC queue."""

    def __init__(self, *, names: Names, service: str, handlers: dict[type[Command], RpcHandler],
                 channel: aio_pika.abc.AbstractChannel, prefetch: int = 32) -> None:
        self.names = names
        self.service = service
        self.handlers = handlers
        self.channel = channel
        self.prefetch = prefetch
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None
        self._inflight: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        await self.channel.set_qos(prefetch_count=self.prefetch)
        # Requests nobody answers in time are worthless: they expire instead of piling up.
        self._queue = await self.channel.declare_queue(
            self.names.rpc_queue(self.service), durable=True, arguments={"x-message-ttl": 60_000})
        self._tag = await self._queue.consume(self._on_request)

    async def stop(self) -> None:
        """Take no new requests; let those in hand finish (a submit cut off half-way leaves a stray job)."""
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except Exception:
                pass
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=30)

    async def _on_request(self, incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        async with incoming.process(requeue=False, ignore_processed=True):
            with correlation(incoming.correlation_id), instrument.serving(self.service, incoming) as served:
                reply, body = await self._dispatch(incoming)
                served.answered(reply)
                if not incoming.reply_to:
                    return
                env = envelope_for(reply, correlation_id=incoming.correlation_id, account_id=None)
                try:
                    out = encode(reply, env, body=body, headers={"x-request-id": incoming.message_id or ""})
                except Exception as exc:  # a reply that cannot be encoded still gets an answer
                    log.exception("rpc_reply_unencodable", service=self.service)
                    error = ErrorReply(code="internal_error", message=f"{self.service}: {type(exc).__name__}")
                    out = encode(error, envelope_for(error, correlation_id=incoming.correlation_id, account_id=None),
                                 headers={"x-request-id": incoming.message_id or ""})
                try:
                    await self.channel.default_exchange.publish(out, routing_key=incoming.reply_to, mandatory=False)
                except Exception as exc:  # the caller went away; nothing to do
                    log.warning("rpc_reply_undeliverable", service=self.service, error=str(exc))

    async def _dispatch(self, incoming: aio_pika.abc.AbstractIncomingMessage) -> tuple[Reply, bytes | None]:
        try:
            msg, envelope, body = decode(incoming)
        except UndecodableMessage as exc:
            return ErrorReply(code="bad_request", message=str(exc), status=400), None
        if isinstance(msg, Ping):
            return Ack(), None
        handler = self.handlers.get(type(msg))  # type: ignore[arg-type]
        if handler is None:
            return ErrorReply(code="unknown_command", message=f"{envelope.type} is not served here", status=400), None
        try:
            result = await (handler(msg, envelope=envelope, body=body) if body is not None
                            else handler(msg, envelope=envelope))
        except RpcError as exc:
            return ErrorReply(code=exc.code, message=exc.message, status=exc.status, details=exc.details), None
        except Exception as exc:
            dependency = unavailable_dependency(exc)
            if dependency is not None:
                log.warning("rpc_dependency_unavailable", service=self.service, command=envelope.type,
                            dependency=dependency, error=f"{type(exc).__name__}: {exc}")
                return ErrorReply(code="service_unavailable", message=f"{self.service}: {dependency} unavailable",
                                  status=503, details={"dependency": dependency}), None
            log.exception("rpc_handler_failed", service=self.service, command=envelope.type)
            return ErrorReply(code="internal_error", message=f"{self.service} failed: {type(exc).__name__}",
                              status=500), None
        if result is None:
            return Ack(), None
        if isinstance(result, tuple):
            return result[0], result[1]
        return result, None


class RpcClient:
    """Sends commands and waits for their replies on the direct reply-to pseudo-queue."""

    def __init__(self, *, names: Names, channel: aio_pika.abc.AbstractChannel, timeout: float = 30.0) -> None:
        self.names = names
        self.channel = channel
        self.timeout = timeout
        self._pending: dict[str, asyncio.Future[tuple[Message, bytes | None]]] = {}
        self._started = False
        self._replies = asyncio.Event()  # set while the channel has a live reply consumer
        # Concurrent first calls must not each register the reply consumer: the broker allows one per channel
        # and closes the channel on a second.
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            await self._consume_replies()
            # The robust channel restores only the queues it declared itself; the reply-to pseudo-queue is not
            # one of them (it cannot be declared), so after a reconnect the channel came back without a reply
            # consumer, and the broker closed it at the first request naming amq.rabbitmq.reply-to: every call
            # failed until the process restarted. The consumer is registered again whenever the channel reopens.
            self.channel.reopen_callbacks.add(self._on_reopen)
            self.channel.close_callbacks.add(self._on_channel_closed)
            self._started = True

    async def _consume_replies(self) -> None:
        queue = await self.channel.get_queue(REPLY_TO, ensure=False)
        await queue.consume(self._on_reply, no_ack=True)
        self._replies.set()

    async def _on_reopen(self, *_: Any) -> None:
        try:
            await self._consume_replies()
            log.info("rpc_reply_consumer_restored")
        except Exception as exc:  # the channel went again; the next reopen tries again
            log.warning("rpc_reply_consumer_not_restored", error=str(exc))

    def _on_channel_closed(self, *_: Any) -> None:
        # Replies to requests sent on the old channel can never arrive: their callers learn it now, not after
        # the whole RPC timeout.
        self._replies.clear()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(BrokerUnavailable("the broker connection dropped before the reply came"))

    async def _ready(self, wait: float) -> None:
        """Wait (briefly) for a channel with a reply consumer; BrokerUnavailable when the broker stays away."""
        if self._replies.is_set():
            return
        try:
            await asyncio.wait_for(self._replies.wait(), min(wait, UNAVAILABLE_WAIT_S))
        except TimeoutError as exc:
            raise BrokerUnavailable("the broker connection is down; retry shortly") from exc

    async def _on_reply(self, incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
        request_id = (incoming.headers or {}).get("x-request-id")
        future = self._pending.pop(str(request_id), None) if request_id else None
        if future is None or future.done():
            return
        try:
            msg, _, body = decode(incoming)
        except UndecodableMessage as exc:
            future.set_exception(RemoteError("bad_reply", str(exc), status=502))
            return
        future.set_result((msg, body))

    async def call(self, service: str, command: Command, *, body: bytes | None = None,
                   account_id: str | None = None, timeout: float | None = None,
                   expect: type[R] | None = None) -> tuple[R, bytes | None]:
        """Send `command` to `service`; returns (reply, binary body) or raises RemoteError / RpcTimeout."""
        await self.start()
        wait = timeout or self.timeout
        await self._ready(wait)
        envelope = envelope_for(command, correlation_id=correlation_id_var.get(),
                                account_id=account_id or getattr(command, "account_id", None))
        future: asyncio.Future[tuple[Message, bytes | None]] = asyncio.get_running_loop().create_future()
        self._pending[envelope.message_id] = future
        out = encode(command, envelope, body=body, reply_to=REPLY_TO, expiration=wait)
        try:
            try:
                await asyncio.wait_for(self.channel.default_exchange.publish(
                    out, routing_key=self.names.rpc_queue(service), mandatory=False), UNAVAILABLE_WAIT_S)
            except (TimeoutError, *BROKER_ERRORS) as exc:
                raise BrokerUnavailable(f"could not send {command.TYPE} to {service}: {type(exc).__name__}") from exc
            reply, reply_body = await asyncio.wait_for(future, wait)
        except TimeoutError as exc:
            raise RpcTimeout(f"{service} did not answer {command.TYPE} within {wait:.0f}s") from exc
        finally:
            self._pending.pop(envelope.message_id, None)
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message, status=reply.status, details=reply.details)
        if expect is not None and not isinstance(reply, expect):
            raise RemoteError("bad_reply", f"{service} answered {reply.TYPE}, expected {expect.TYPE}", status=502)
        return reply, reply_body  # type: ignore[return-value]


