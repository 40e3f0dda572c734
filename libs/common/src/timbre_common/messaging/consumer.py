"""Consuming with an explicit policy.

- success: ack (and remember the message id when a deduper is given);
- a message that cannot be decoded: reject without requeue, so the broker dead-letters it at once;
- a handler error: republish to the next retry tier (1 s, 5 s, 30 s) with the attempt count, then ack;
  after `max_attempts`, publish to the dead-letter queue with the reason, then ack;
- a consumer that dies holding a message: the broker redelivers it; a message that keeps killing its
  consumer is dead-lettered by the quorum queue's delivery limit.
"""
from __future__ import annotations

import asyncio
import contextlib
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import aio_pika

from ..availability import unavailable_dependency
from ..contracts import Envelope, Message
from ..logging import correlation, get_logger
from . import instrument
from .codec import UndecodableMessage, decode
from .topology import RETRY_DELAYS, Names, QueueSpec

log = get_logger(__name__)

Handler = Callable[..., Awaitable[Any]]
ATTEMPT_HEADER = "x-attempt"
# How long a delivery is held while the consumer's own database is unreachable, before it is handed back.
OUTAGE_PATIENCE_S = 60.0


class Deduper(Protocol):
    """Remembers which message ids a consumer has already handled."""

    async def seen(self, consumer: str, message_id: str) -> bool: ...

    async def remember(self, consumer: str, message_id: str) -> None: ...


class Consumer:
    """Feeds one queue's messages to the handlers registered for their types."""

    def __init__(self, *, names: Names, spec: QueueSpec, handlers: dict[type[Message], Handler],
                 channel: aio_pika.abc.AbstractChannel, deduper: Deduper | None = None) -> None:
        self.names = names
        self.spec = spec
        self.handlers = handlers
        self.channel = channel
        self.deduper = deduper
        self._tag: str | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._id_locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def start(self) -> None:
        await self.channel.set_qos(prefetch_count=self.spec.prefetch)
        self._queue = await self.channel.get_queue(self.names.queue(self.spec.name), ensure=True)
        # The consumer binds its own queue (idempotent): a binding added by configuration (the Modal backends)
        # reaches a queue that already existed, and a provisioned broker user may bind its own queues only.
        for key in self.spec.bindings:
            await self._queue.bind(self.names.events, routing_key=key)
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stop taking messages and let those in hand finish (unfinished ones are redelivered)."""
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except Exception:  # the channel may already be gone at shutdown
                pass
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=30)

    async def _on_message(self, incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            with instrument.consuming(self.spec.name, incoming):
                await self._handle_through_outages(incoming)
        except Exception:
            # Anything the policy itself could not handle (the deduper's database down, say): hand the message
            # back rather than hold its prefetch slot forever. A quorum queue counts the redelivery against
            # the delivery limit, so this stays bounded.
            log.exception("message_handling_failed", queue=self.spec.name, message_id=incoming.message_id)
            if not incoming.processed:
                await incoming.nack(requeue=True)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _handle_through_outages(self, incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
        """`handle`, waiting out a database outage of the policy itself (the deduper) with the message in hand.

        Handed back at once, the message would come straight back, again and again within the outage, and a
        restart of PostgreSQL would dead-letter it by the quorum queue's delivery limit. Held, it waits up
        to OUTAGE_PATIENCE_S. A broker failure is not waited out: its delivery is void and comes again anyway.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OUTAGE_PATIENCE_S
        delay = 0.5
        while True:
            try:
                await self.handle(incoming)
                return
            except Exception as exc:
                dependency = unavailable_dependency(exc)
                if (dependency in (None, "broker") or incoming.processed
                        or loop.time() + delay > deadline):
                    raise
                log.warning("message_waiting_for_dependency", queue=self.spec.name, dependency=dependency,
                            message_id=incoming.message_id, retry_in_s=delay, error=f"{type(exc).__name__}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def handle(self, incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Apply the policy above to one delivery."""
        with correlation(incoming.correlation_id):
            try:
                msg, envelope, body = decode(incoming)
            except UndecodableMessage as exc:
                log.error("message_undecodable", queue=self.spec.name, type=incoming.type,
                          message_id=incoming.message_id, reason=str(exc))
                await incoming.reject(requeue=False)
                instrument.dead_lettered(self.spec.name, "undecodable")
                return
            handler = self.handlers.get(type(msg))
            if handler is None:
                # Bound but unhandled (an additive new version, say): nothing to do with it.
                log.warning("message_unhandled", queue=self.spec.name, type=envelope.type)
                await incoming.ack()
                return
            consumer_name = self.names.queue(self.spec.name)
            # Two deliveries of one message id handled at once would both pass `seen` before either is
            # remembered: within a process they take turns (the broker redelivers to the same consumer).
            async with self._one_at_a_time(envelope.message_id if self.deduper else None):
                if self.deduper and envelope.message_id and await self.deduper.seen(consumer_name, envelope.message_id):
                    log.info("message_duplicate", queue=self.spec.name, type=envelope.type,
                             message_id=envelope.message_id)
                    await incoming.ack()
                    return
                try:
                    if body is None:
                        await handler(msg, envelope=envelope)
                    else:
                        await handler(msg, envelope=envelope, body=body)
                except Exception as exc:  # every handler error is retried, then dead-lettered
                    await self._retry_or_dead_letter(incoming, envelope, exc)
                    return
                if self.deduper and envelope.message_id:
                    try:
                        await self.deduper.remember(consumer_name, envelope.message_id)
                    except Exception:  # done is done: a redelivery meets an idempotent handler
                        log.exception("message_dedupe_not_recorded", queue=self.spec.name,
                                      message_id=envelope.message_id)
                await incoming.ack()
                instrument.handled(self.spec.name, envelope.type)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, message_id: str | None) -> AsyncIterator[None]:
        """Serialise the handling of deliveries that share a message id (nothing to do without one)."""
        if not message_id:
            yield
            return
        lock, users = self._id_locks.get(message_id, (asyncio.Lock(), 0))
        self._id_locks[message_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._id_locks[message_id]
            if users <= 1:
                del self._id_locks[message_id]
            else:
                self._id_locks[message_id] = (lock, users - 1)

    async def _retry_or_dead_letter(self, incoming: aio_pika.abc.AbstractIncomingMessage,
                                    envelope: Envelope, exc: Exception) -> None:
        headers = dict(incoming.headers or {})
        attempt = int(headers.get(ATTEMPT_HEADER, 1) or 1)  # type: ignore[arg-type]
        reason = f"{type(exc).__name__}: {exc}"
        copy = aio_pika.Message(
            bytes(incoming.body),
            message_id=incoming.message_id,
            type=incoming.type,
            correlation_id=incoming.correlation_id,
            content_type=incoming.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=incoming.timestamp,
            headers={**headers, ATTEMPT_HEADER: attempt + 1, "x-last-error": reason[:500]},
        )
        try:
            if attempt < self.spec.max_attempts:
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS)) - 1]
                log.warning("message_retry", queue=self.spec.name, type=envelope.type, attempt=attempt,
                            delay_s=delay, error=reason)
                exchange = await self.channel.get_exchange(self.names.retries, ensure=False)
                await exchange.publish(copy, routing_key=self.names.retry_queue(self.spec.name, delay))
                instrument.retried(self.spec.name, envelope.type)
            else:
                log.error("message_dead_lettered", queue=self.spec.name, type=envelope.type, attempt=attempt,
                          error=reason, trace="".join(traceback.format_exception(exc))[-2000:])
                exchange = await self.channel.get_exchange(self.names.dead_letters, ensure=False)
                await exchange.publish(copy, routing_key=self.names.queue(self.spec.name))
                instrument.dead_lettered(self.spec.name, "attempts")
        except Exception as publish_exc:
            # Could not park it: hand it back to the broker rather than lose it.
            log.error("message_requeued", queue=self.spec.name, error=str(publish_exc))
            await incoming.nack(requeue=True)
            return
        await incoming.ack()
