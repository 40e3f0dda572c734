"""Running a service process: configure logging, start, wait for SIGINT/SIGTERM, stop cleanly."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Protocol

from . import tracing
from .logging import configure_logging, get_logger

log = get_logger(__name__)


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# How long a service has to stop after SIGTERM/SIGINT before the process ends anyway (SHUTDOWN_TIMEOUT_S).
DEFAULT_SHUTDOWN_TIMEOUT_S = 15.0


def shutdown_timeout_s() -> float:
    try:
        return max(1.0, float(os.environ.get("SHUTDOWN_TIMEOUT_S", DEFAULT_SHUTDOWN_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_SHUTDOWN_TIMEOUT_S


def _exit_now(status: int, event: str, **fields: object) -> None:
    log.error(event, **fields)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


async def serve_until_signalled(service: Service, *, timeout_s: float | None = None) -> None:
    """Start `service`, run until a signal arrives, then stop it, within a bounded time.

    A signal during start abandons the start; a stop that overruns `timeout_s`, a second signal, or an event loop
    too stuck to run the stop at all (a watchdog thread) ends the process anyway: an orchestrator's SIGTERM
    is never ignored. Whatever was left unfinished is redelivered by the broker.
    """
    grace = timeout_s if timeout_s is not None else shutdown_timeout_s()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            _exit_now(1, "service_killed_by_second_signal", signal=signum)
        stop.set()
        watchdog = threading.Timer(grace + 5.0, _exit_now, args=(1, "service_stop_watchdog_fired"),
                                   kwargs={"timeout_s": grace + 5.0})
        watchdog.daemon = True
        watchdog.start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    starting = asyncio.create_task(service.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.warning("service_start_abandoned")
        starting.cancel()
        await asyncio.wait({starting}, timeout=min(grace, 5.0))
    else:
        starting.result()  # a failed start raises here
        log.info("service_started")
        await stopping
    log.info("service_stopping", timeout_s=grace)
    try:
        await asyncio.wait_for(service.stop(), grace)
    except TimeoutError:
        _exit_now(1, "service_stop_timed_out", timeout_s=grace)
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

        # Requests still running after this long at shutdown are cut off: a stop is bounded.
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
                                server_header=False, timeout_graceful_shutdown=max(1, int(shutdown_timeout_s() / 2)))
        self._server = uvicorn.Server(config)
        # The process's own handlers stay in charge: uvicorn would take SIGTERM over while it serves and raise it
        # again once it stopped, which the process would take for a second signal and exit mid-shutdown.
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
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
