"""Running a service process: configure logging, start, wait for SIGINT/SIGTERM, stop cleanly."""
from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

from . import tracing
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
    """Entry point of a service's `__main__`: logging, traces and metrics as configured, then the service."""
    from .metrics import MetricsServer
    from .settings import CommonSettings

    configure_logging(name, log_level)
    settings = CommonSettings()
    if tracing.configure(name):
        log.info("tracing_enabled")

    async def main() -> None:
        exposer = None
        if settings.metrics_port:
            exposer = MetricsServer(host=settings.metrics_host, port=settings.metrics_port,
                                    secret=settings.metrics_secret.get_secret_value())
            await exposer.start()
            log.info("metrics_listening", url=f"http://{settings.metrics_host}:{settings.metrics_port}/metrics")
        try:
            service = await build()
            await serve_until_signalled(service)
        finally:
            if exposer is not None:
                await exposer.stop()

    try:
        asyncio.run(main())
    finally:
        tracing.shutdown()


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
