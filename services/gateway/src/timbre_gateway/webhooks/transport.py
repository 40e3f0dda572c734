"""The two adapters of deliveries: the schedule over RabbitMQ, and the HTTP POST to a checked, pinned address."""
from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import aio_pika
import httpx

from timbre_common.contracts import utcnow
from timbre_common.contracts.webhooks import WebhookDeliveryDue
from timbre_common.logging import correlation_id_var
from timbre_common.messaging import QUEUES, RETRY_DELAYS, encode, envelope_for

from . import domain
from .handlers import DeliveryError
from .targets import Resolver, TargetPolicy, TargetRefused, check_target, pinned_url, system_resolver

DELIVERY_QUEUE = QUEUES["gateway.webhook_deliveries"].name
MAX_ANSWER_BYTES = 1024


class BusScheduler:
    """Puts a delivery's next attempt on the bus: at once when due, else through the longest retry tier that
    does not overshoot (the retry queues dead-letter back into the delivery queue), hop after hop."""

    def __init__(self, bus: Any, tiers: tuple[int, ...] = RETRY_DELAYS) -> None:
        self.bus = bus
        self.tiers = tiers
        self._retries: aio_pika.abc.AbstractExchange | None = None

    async def start(self) -> None:
        channel = await self.bus.connection.channel(publisher_confirms=True)
        self._retries = await channel.get_exchange(self.bus.names.retries, ensure=False)

    async def schedule(self, due: WebhookDeliveryDue) -> None:
        remaining = (due.due_at - utcnow()).total_seconds()
        if remaining < min(self.tiers) / 2:
            await self.bus.publish(due)
        else:
            await self._hop(due, domain.hop_delay(remaining, self.tiers))

    async def later(self, due: WebhookDeliveryDue) -> None:
        await self._hop(due, min(self.tiers))

    async def _hop(self, due: WebhookDeliveryDue, delay: int) -> None:
        assert self._retries is not None, "BusScheduler.start() first"
        envelope = envelope_for(due, correlation_id=correlation_id_var.get(), account_id=due.account_id)
        await self._retries.publish(encode(due, envelope),
                                    routing_key=self.bus.names.retry_queue(DELIVERY_QUEUE, delay))


class HttpSender:
    """POSTs a delivery: the target is checked again (the name may now resolve elsewhere), the connection goes to
    the checked address (TLS still verifies the name), redirects are not followed, the whole attempt is bounded."""

    def __init__(self, policy: TargetPolicy, *, timeout_s: float, resolver: Resolver = system_resolver) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.resolver = resolver
        # No kept-alive connections: each attempt connects to the address it has just checked.
        self.client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout_s,
                                        limits=httpx.Limits(max_keepalive_connections=0))

    async def close(self) -> None:
        await self.client.aclose()

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        try:
            target, addresses = await check_target(url, self.policy, self.resolver)
        except TargetRefused as exc:
            raise DeliveryError(f"{exc.code}: {exc.message}") from None
        address = addresses[0]
        default_port = 443 if target.scheme == "https" else 80
        host = f"[{target.host}]" if ":" in target.host else target.host
        extensions: dict[str, Any] = {}
        try:
            ipaddress.ip_address(target.host)
        except ValueError:
            if target.scheme == "https":
                extensions["sni_hostname"] = target.host
        request = self.client.build_request(
            "POST", pinned_url(target, address), content=body, extensions=extensions,
            headers={**headers, "Host": host if target.port == default_port else f"{host}:{target.port}"})
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self.client.send(request, stream=True)
                try:
                    answer = b""
                    async for piece in response.aiter_raw():
                        answer += piece
                        if len(answer) >= MAX_ANSWER_BYTES:
                            break
                finally:
                    await response.aclose()
        except TimeoutError:
            raise DeliveryError(f"no answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}"[:300]) from None
        return response.status_code, answer[:MAX_ANSWER_BYTES].decode("utf-8", "replace")
