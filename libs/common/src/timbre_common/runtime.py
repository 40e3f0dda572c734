"""Running a service process: configure logging, start, wait for SIGINT/SIGTERM, stop cleanly."""
from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

from .logging import configure_logging, get_logger

log = get_logger(__name__)


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def serve_until_signalled(service: Service) -> None:
    """Start `service`, run until a signal arrives, then stop it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    log.info("service_started")
    await stop.wait()
    log.info("service_stopping")
    await service.stop()
    log.info("service_stopped")


def run(name: str, build: Callable[[], Awaitable[Service]], log_level: str = "INFO") -> None:
    """Entry point of a service's `__main__`."""
    configure_logging(name, log_level)

    async def main() -> None:
        service = await build()
        await serve_until_signalled(service)

    asyncio.run(main())


class HttpServer:
    """A uvicorn server inside a service's event loop (the process handles signals, not uvicorn)."""

    def __init__(self, app: object, *, host: str, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
                                server_header=False)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Return once the socket is listening (or raise what stopped it)."""
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("HTTP server exited before it started")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Finish requests in flight, then close."""
        if self._task is not None:
            self._server.should_exit = True
            await self._task
