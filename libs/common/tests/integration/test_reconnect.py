"""Reconnects against a real broker of the test's own: RPC client, RPC server, consumers and subscriptions
keep working after their connection is dropped and after the broker restarts, with no process restarted."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import ClassVar

import pytest

from timbre_common.contracts import Command, Event, Reply
from timbre_common.messaging import BrokerUnavailable, Bus, QueueSpec, RpcTimeout
from timbre_common.sandbox import PrivateBroker


class Pinged(Event):
    TYPE: ClassVar[str] = "test.pinged"
    n: int


class Beat(Event):
    TYPE: ClassVar[str] = "test.beat"
    n: int


class Triple(Command):
    TYPE: ClassVar[str] = "test.triple"
    n: int


class Tripled(Reply):
    TYPE: ClassVar[str] = "test.tripled"
    n: int


SPEC = QueueSpec("test.reconnect", (Pinged.routing_key(),), max_attempts=2)
RECOVERY_S = 60.0


@pytest.fixture(scope="module")
def broker():
    node = PrivateBroker().start()
    yield node
    node.stop()


class Platform:
    """Two processes' worth of buses: `server` answers Triple and consumes Pinged; `client` calls and subscribes."""

    def __init__(self, broker: PrivateBroker) -> None:
        self.broker = broker
        ns = f"r{uuid.uuid4().hex[:8]}"
        self.server_name = f"srv-{ns}"
        self.client_name = f"cli-{ns}"
        self.server = Bus(url=broker.url, namespace=ns, service=self.server_name, rpc_timeout=3)
        self.client = Bus(url=broker.url, namespace=ns, service=self.client_name, rpc_timeout=3)
        self.consumed: list[int] = []
        self.beats: list[int] = []

    async def start(self) -> None:
        await self.server.connect(declare=[SPEC])
        await self.client.connect()

        async def triple(cmd: Triple, *, envelope) -> Tripled:
            return Tripled(n=cmd.n * 3)

        async def on_ping(msg: Pinged, *, envelope) -> None:
            self.consumed.append(msg.n)

        async def on_beat(msg: Beat, *, envelope) -> None:
            self.beats.append(msg.n)

        await self.server.serve({Triple: triple})
        await self.server.consume(SPEC, {Pinged: on_ping})
        await self.client.subscribe([Beat], on_beat)

    async def close(self) -> None:
        await self.client.close()
        await self.server.close()

    async def until_rpc_works(self, n: int) -> float:
        """Seconds until a call goes through again; fails past RECOVERY_S."""
        started = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - started < RECOVERY_S:
            try:
                reply, _ = await self.client.call(self.server_name, Triple(n=n), timeout=2)
                assert reply.n == n * 3
                return time.monotonic() - started
            except (RpcTimeout, BrokerUnavailable) as exc:
                last = exc
                await asyncio.sleep(0.2)
        raise AssertionError(f"RPC did not recover within {RECOVERY_S:.0f}s: {last!r}")

    async def until_event_consumed(self, n: int) -> None:
        """An event published now (by either side) reaches the consumer."""
        deadline = time.monotonic() + RECOVERY_S
        while time.monotonic() < deadline:
            try:
                await self.client.publish(Pinged(n=n))
                break
            except BrokerUnavailable:
                await asyncio.sleep(0.2)
        while time.monotonic() < deadline:
            if n in self.consumed:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"event {n} was not consumed; consumed so far {self.consumed}")

    async def until_beat_heard(self, n: int) -> None:
        deadline = time.monotonic() + RECOVERY_S
        while time.monotonic() < deadline:
            try:
                await self.server.publish(Beat(n=n))
            except BrokerUnavailable:
                pass
            await asyncio.sleep(0.3)
            if n in self.beats:
                return
        raise AssertionError(f"beat {n} was not heard; heard {self.beats}")


@pytest.fixture
async def platform(broker: PrivateBroker):
    p = Platform(broker)
    await p.start()
    yield p
    await p.close()


async def _works(p: Platform, n: int) -> None:
    await p.until_rpc_works(n)
    await p.until_event_consumed(n)
    await p.until_beat_heard(n)


async def test_rpc_client_recovers_when_its_connection_is_dropped(platform: Platform):
    await _works(platform, 1)
    assert await asyncio.to_thread(platform.broker.close_connections_named,
                                   platform.client.connection_name) == 1
    await _works(platform, 2)
    # And keeps working: the reply consumer is registered once, not once per reconnect.
    replies = await asyncio.gather(*[platform.client.call(platform.server_name, Triple(n=i)) for i in range(20)])
    assert [r.n for r, _ in replies] == [i * 3 for i in range(20)]


async def test_rpc_server_and_consumer_recover_when_their_connection_is_dropped(platform: Platform):
    await _works(platform, 1)
    assert await asyncio.to_thread(platform.broker.close_connections_named,
                                   platform.server.connection_name) == 1
    await _works(platform, 2)


async def test_everything_recovers_after_a_broker_restart(platform: Platform):
    await _works(platform, 1)
    await asyncio.to_thread(platform.broker.restart)
    await _works(platform, 2)
    # Twice: what was restored once must be restorable again.
    await asyncio.to_thread(platform.broker.restart)
    await _works(platform, 3)


async def test_calls_during_an_outage_fail_fast_as_unavailable(platform: Platform):
    """A call made while the broker is away is refused as unavailable, not left to hang for the RPC timeout."""
    await _works(platform, 1)
    await asyncio.to_thread(platform.broker.stop_app)
    try:
        # Unavailable, not a timeout: the call did not sit out its (long) RPC timeout.
        with pytest.raises(BrokerUnavailable):
            await platform.client.call(platform.server_name, Triple(n=5), timeout=120)
        with pytest.raises(BrokerUnavailable):
            await platform.client.publish(Pinged(n=5))
    finally:
        await asyncio.to_thread(platform.broker.start_app)
    await _works(platform, 6)


async def test_the_healthcheck_probe_pings_a_service_over_the_broker(platform: Platform):
    from timbre_common.probe import ping

    ns = platform.server.names.ns
    await ping(platform.server_name, url=platform.broker.url, namespace=ns, timeout=3)
    with pytest.raises(RpcTimeout):
        await ping("nobody", url=platform.broker.url, namespace=ns, timeout=1)


async def test_a_server_whose_database_is_down_answers_unavailable_not_internal_error(broker: PrivateBroker):
    import asyncpg

    from timbre_common.messaging import RemoteError

    ns = f"r{uuid.uuid4().hex[:8]}"
    server = await Bus(url=broker.url, namespace=ns, service="srv", rpc_timeout=3).connect()
    client = await Bus(url=broker.url, namespace=ns, service="cli", rpc_timeout=3).connect()
    try:
        async def triple(cmd: Triple, *, envelope) -> Tripled:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")

        await server.serve({Triple: triple})
        with pytest.raises(RemoteError) as err:
            await client.call("srv", Triple(n=1))
        assert (err.value.status, err.value.code) == (503, "service_unavailable")
        assert err.value.details == {"dependency": "database"}
    finally:
        await client.close()
        await server.close()
