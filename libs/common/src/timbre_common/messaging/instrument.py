"""Metrics and trace spans of the messaging layer, kept out of the transport code: each is one `with`."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aio_pika

from .. import metrics, tracing
from ..contracts import ErrorReply


@contextmanager
def rpc_call(service: str, command: str) -> Iterator[None]:
    """A client span and the latency of one RPC, by target service, command and outcome."""
    started, outcome = time.perf_counter(), "ok"
    try:
        with tracing.span(f"{service} {command}", kind="client", **{"rpc.service": service, "rpc.method": command}):
            yield
    except Exception as exc:
        from .rpc import RpcTimeout  # here: rpc.py itself imports this module

        # A RemoteError's refusal (4xx) is an answer, its 5xx a failure; no answer in time is a timeout.
        status = getattr(exc, "status", None)
        if isinstance(exc, RpcTimeout):
            outcome = "timeout"
        else:
            outcome = "refused" if isinstance(status, int) and status < 500 else "error"
        raise
    finally:
        metrics.RPC_CLIENT_LATENCY.labels(service, command, outcome).observe(time.perf_counter() - started)


class Served:
    """What `serving` learns of the reply."""

    outcome = "ok"

    def answered(self, reply: Any) -> None:
        if isinstance(reply, ErrorReply):
            self.outcome = "refused" if reply.status < 500 else "error"


@contextmanager
def serving(service: str, incoming: aio_pika.abc.AbstractIncomingMessage) -> Iterator[Served]:
    """A server span continuing the caller's trace, and the time to handle and answer one command."""
    served, started = Served(), time.perf_counter()
    command = incoming.type or "unknown"
    try:
        with tracing.continued(f"{service} {command}", incoming.headers, kind="server",
                               **{"rpc.service": service, "rpc.method": command,
                                  "timbre.correlation_id": incoming.correlation_id}):
            yield served
    finally:
        metrics.RPC_SERVER_LATENCY.labels(command, served.outcome).observe(time.perf_counter() - started)


@contextmanager
def consuming(queue: str, incoming: aio_pika.abc.AbstractIncomingMessage) -> Iterator[None]:
    """A consumer span continuing the publisher's trace, and the time spent on the message."""
    started = time.perf_counter()
    try:
        with tracing.continued(f"{queue} process", incoming.headers, kind="consumer",
                               **{"messaging.system": "rabbitmq", "messaging.destination.name": queue,
                                  "messaging.message.id": incoming.message_id, "timbre.message_type": incoming.type,
                                  "timbre.correlation_id": incoming.correlation_id}):
            yield
    finally:
        metrics.MESSAGE_HANDLING.labels(queue).observe(time.perf_counter() - started)


def publishing(routing_key: str, message_id: str | None = None) -> Any:
    """A producer span around one publish inside a trace (the message carries its traceparent)."""
    return tracing.child_span(f"{routing_key} publish", kind="producer",
                              **{"messaging.system": "rabbitmq", "messaging.destination.name": routing_key,
                                 "messaging.message.id": message_id})


def handled(queue: str, type_: str | None) -> None:
    metrics.MESSAGES_HANDLED.labels(queue, type_ or "unknown").inc()


def retried(queue: str, type_: str | None) -> None:
    metrics.MESSAGES_RETRIED.labels(queue, type_ or "unknown").inc()


def dead_lettered(queue: str, reason: str) -> None:
    metrics.MESSAGES_DEAD_LETTERED.labels(queue, reason).inc()
