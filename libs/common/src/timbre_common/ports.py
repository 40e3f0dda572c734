"""What handlers need of the bus: publish events, call other services, and a transaction in which state changes
and the events announcing them commit together (the outbox). Fakes implement the same."""
from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from .contracts import Command, Event, Message


class MessageBus(Protocol):
    async def publish(self, event: Event, *, body: bytes | None = None, account_id: str | None = None,
                      message_id: str | None = None, correlation_id: str | None = None,
                      routing_key: str | None = None) -> str: ...

    async def call(self, service: str, command: Command, *, body: bytes | None = None,
                   account_id: str | None = None, timeout: float | None = None,
                   expect: type | None = None) -> tuple[Any, bytes | None]: ...

    async def send(self, queue: str, message: Message, *, body: bytes | None = None,
                   account_id: str | None = None) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[None]: ...
