"""Fakes for unit tests of handlers: a bus that records what is published and answers calls."""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
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

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """The outbox's transaction (timbre_common.messaging.outbox); in memory, nothing to commit."""
        yield

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


def load_module(name: str, path: Path) -> ModuleType:
    """A helper module of the tests by path (tests are not packages), loaded once whoever asks first."""
    import importlib.util
    import sys

    path = Path(path).resolve()
    for module in list(sys.modules.values()):  # pytest may have loaded it already, under another name
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path:
            return module
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses look their module up in sys.modules while being built.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def envelope(**kwargs: Any) -> Envelope:
    """An envelope for calling a handler directly."""
    return Envelope(type=kwargs.pop("type", "test"), version=1, **kwargs)


def in_ci() -> bool:
    """True under CI, where a missing tool fails a test instead of skipping it."""
    import os

    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def chromium_path() -> str:
    """Debian's chromium (requirements/apt.txt); fails in CI, skips elsewhere, when it is missing."""
    import shutil

    import pytest

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if in_ci():
        pytest.fail("chromium is missing in CI: requirements/apt.txt lists it")
    pytest.skip("chromium not installed (apt-get install -y chromium)")


def promtool_path() -> str:
    """Prometheus' promtool (Debian's `prometheus`, requirements/apt.txt); fails in CI, skips elsewhere."""
    import shutil

    import pytest

    if path := shutil.which("promtool"):
        return path
    if in_ci():
        pytest.fail("promtool is missing in CI: requirements/apt.txt lists prometheus, which ships it")
    pytest.skip("promtool not installed (apt-get install -y --no-install-recommends prometheus)")


def headless_dom(url: str, profile: Path, budget_ms: int = 0, timeout_s: float = 120) -> str:
    """The DOM of `url` after its scripts ran for `budget_ms` of virtual time, in headless chromium."""
    import subprocess

    # No background networking: the machine's closed network refuses those connections, many at a time.
    args = [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}"]
    if budget_ms:
        args.append(f"--virtual-time-budget={budget_ms}")
    done = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class LoopbackServer:
    """An ASGI app under uvicorn on a free 127.0.0.1 port, in a daemon thread (fakes of outside services)."""

    def __init__(self, app: Any) -> None:
        import socket
        import threading

        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", loop="asyncio",
                                http="h11")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self) -> LoopbackServer:
        import time

        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("loopback server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()
