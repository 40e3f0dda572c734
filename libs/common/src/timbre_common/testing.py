"""Fakes for unit tests of handlers: a bus that records what is published and answers calls."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .contracts import Command, Envelope, Event

Responder = Callable[[Command, bytes | None], Awaitable[Any]]


class FakeBus:
    """Implements timbre_common.ports.MessageBus in memory."""

    def __init__(self) -> None:
        self.published: list[tuple[Event, bytes | None, str | None]] = []
        self.routing_keys: list[str] = []
        self.calls: list[tuple[str, Command, bytes | None]] = []
        self.responders: dict[type[Command], Responder] = {}

    def on(self, command: type[Command], responder: Responder) -> None:
        self.responders[command] = responder

    async def publish(self, event: Event, *, body: bytes | None = None, account_id: str | None = None,
                      message_id: str | None = None, correlation_id: str | None = None,
                      routing_key: str | None = None) -> str:
        self.published.append((event, body, message_id))
        self.routing_keys.append(routing_key or event.routing_key())
        return message_id or f"m{len(self.published)}"

    async def call(self, service: str, command: Command, *, body: bytes | None = None,
                   account_id: str | None = None, timeout: float | None = None,
                   expect: type | None = None) -> tuple[Any, bytes | None]:
        self.calls.append((service, command, body))
        responder = self.responders.get(type(command))
        if responder is None:
            raise AssertionError(f"no fake answer for {type(command).__name__}")
        result = await responder(command, body)
        return result if isinstance(result, tuple) else (result, None)

    def events(self, cls: type[Event]) -> list[Event]:
        return [e for e, _, _ in self.published if isinstance(e, cls)]


def envelope(**kwargs: Any) -> Envelope:
    """An envelope for calling a handler directly."""
    return Envelope(type=kwargs.pop("type", "test"), version=1, **kwargs)
