"""The gateway's limits through its HTTP app: a dead Redis still limits (per process), and POST /v1/checkout is
limited per client address in the real Redis."""
from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import redis.asyncio as aioredis
from pydantic import SecretStr

from timbre_common.contracts.billing import CheckoutStarted, StartCheckout, UsageReport
from timbre_gateway.adapters.limits import RedisLimiter
from timbre_gateway.domain import mint_api_key
from timbre_gateway.http.app import create_app

KEY = mint_api_key()


class OneKey:
    """The accounts read model with one active key."""

    async def authenticate(self, token: str) -> dict[str, Any] | None:
        if token != KEY:
            return None
        return {"account_id": uuid.UUID(int=1), "key_id": uuid.UUID(int=2), "rate_per_minute": 1,
                "max_concurrent": 4, "account_status": "active"}


class Bus:
    """Answers the two RPCs these routes make, and counts them."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    async def call(self, service: str, command: Any, **_: Any) -> tuple[Any, None]:
        self.calls.append(command)
        if isinstance(command, StartCheckout):
            return CheckoutStarted(url="https://checkout.stripe.test/c/pay/cs_1"), None
        now = datetime.now(UTC)
        return UsageReport(account_id=command.account_id, period_start=now, period_end=now, characters_used=0), None


def _gateway(limiter: RedisLimiter, **settings: Any) -> tuple[httpx.AsyncClient, Bus]:
    values = {"modal_callback_secret": SecretStr(""), "admin_secret": SecretStr("admin"),
              "max_upload_bytes": 1 << 20, "max_json_body_bytes": 1 << 20, "max_callback_body_bytes": 1 << 20,
              "max_webhook_body_bytes": 1 << 20, "rate_limit_per_minute": 120, "max_concurrent_requests": 16,
              "checkout_rate_per_minute": 10, **settings}
    bus = Bus()
    ctx = SimpleNamespace(settings=SimpleNamespace(**values), accounts=OneKey(), limiter=limiter, bus=bus)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://gw"), bus


async def test_a_key_limited_to_one_request_gets_one_while_redis_is_down() -> None:
    """Before: 10,000 of 10,000 requests passed with a limit of 1 when Redis was unreachable."""
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2)
    client, bus = _gateway(RedisLimiter(dead, namespace=f"t{uuid.uuid4().hex[:8]}"))
    async with client:
        answers = [await client.get("/v1/usage", headers={"Authorization": f"Bearer {KEY}"}) for _ in range(300)]
    assert [r.status_code for r in answers].count(200) == 1
    refused = [r for r in answers if r.status_code == 429]
    assert len(refused) == 299 and refused[0].json()["error"]["code"] == "rate_limited"
    assert int(refused[0].headers["retry-after"]) >= 1
    assert len(bus.calls) == 1
    await dead.aclose()


async def test_checkout_is_limited_per_client_address(redis_url: str) -> None:
    redis = aioredis.from_url(redis_url)
    namespace = f"t{uuid.uuid4().hex[:8]}"
    client, bus = _gateway(RedisLimiter(redis, namespace=namespace), checkout_rate_per_minute=3)
    async with client:
        answers = [await client.post("/v1/checkout", json={"email": f"a{i}@example.com"}) for i in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
    assert answers[3].json()["error"]["code"] == "rate_limited" and answers[3].headers["retry-after"]
    # The refused ones cost nothing: no RPC, so no Stripe call and no row.
    assert len(bus.calls) == 3
    # The budget is the address's, kept in Redis where every replica sees it.
    other, _ = _gateway(RedisLimiter(redis, namespace=namespace), checkout_rate_per_minute=3)
    async with other:
        r = await other.post("/v1/checkout", json={"email": "b@example.com"})
    assert r.status_code == 429
    keys = [k async for k in redis.scan_iter(match=f"timbre:{namespace}:*")]
    assert keys and all(b"checkout-ip:127.0.0.1" in k for k in keys)
    await redis.delete(*keys)
    await redis.aclose()
