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


async def serve_until_signalled(service: Service, name: str) -> None:
    """Start `service`, run until a signal arrives, then stop it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    log.info("service_started", service=name)
    await stop.wait()
    log.info("service_stopping", service=name)
    await service.stop()
    log.info("service_stopped", service=name)


def run(name: str, build: Callable[[], Awaitable[Service]], log_level: str = "INFO") -> None:
    """Entry point of a service's `__main__`."""
    configure_logging(name, log_level)

    async def main() -> None:
        service = await build()
        await serve_until_signalled(service, name)

    asyncio.run(main())
