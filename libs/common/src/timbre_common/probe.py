"""`python -m timbre_common.probe SERVICE`: exit 0 when SERVICE answers a ping over the broker, 1 otherwise.

A container healthcheck for the services without an HTTP port: it proves the process is alive, connected to
the broker and consuming its RPC queue (what a reconnect that left it deaf would break).
"""
from __future__ import annotations

import asyncio
import os
import sys
import uuid

from .contracts import Ping
from .messaging import Bus


async def ping(service: str, *, url: str, namespace: str, timeout: float) -> None:
    bus = await Bus(url=url, namespace=namespace, service=f"probe-{uuid.uuid4().hex[:6]}").connect()
    try:
        await bus.call(service, Ping(), timeout=timeout)
    finally:
        await bus.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m timbre_common.probe SERVICE", file=sys.stderr)
        return 2
    try:
        asyncio.run(asyncio.wait_for(ping(argv[0], url=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
                                          namespace=os.environ.get("BUS_NAMESPACE", "timbre"), timeout=3.0), 8.0))
    except Exception as exc:
        print(f"{argv[0]}: not answering ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
