"""Per-key rate and concurrency limits around each authenticated request, and their response headers."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..adapters.limits import retry_after
from .errors import ApiError

_STATE_KEY = "rate_limit_headers"


@contextlib.asynccontextmanager
async def limit_request(request: Request, ctx: Any, *, key_id: str, rate_per_minute: int | None,
                        max_concurrent: int | None) -> AsyncIterator[None]:
    """Count the request against the key's rate; hold a concurrency slot until it ends; 429 otherwise."""
    limiter = getattr(ctx, "limiter", None)
    if limiter is None:
        yield
        return
    rate = rate_per_minute or ctx.settings.rate_limit_per_minute
    concurrency = max_concurrent or ctx.settings.max_concurrent_requests
    admit = getattr(limiter, "admit", None)
    if admit is not None:  # one round trip for both
        decision, lease = await admit(key_id, rate, concurrency)
    else:
        decision = await limiter.hit(key_id, rate)
        lease = await limiter.acquire(key_id, concurrency) if decision.allowed else None
    headers = {"X-RateLimit-Limit": str(decision.limit), "X-RateLimit-Remaining": str(decision.remaining)}
    if not decision.allowed:
        raise ApiError(429, "rate_limited", f"more than {decision.limit} requests per minute for this key",
                       headers={"Retry-After": retry_after(decision.retry_after_s), **headers})
    if lease is None:
        raise ApiError(429, "too_many_concurrent_requests",
                       f"more than {concurrency} requests in flight for this key",
                       headers={"Retry-After": "1", **headers})
    request.state.rate_limit_headers = headers
    renewer = asyncio.create_task(_keep_renewed(limiter, lease))
    try:
        yield
    finally:
        renewer.cancel()
        await limiter.release(lease)


async def _keep_renewed(limiter: Any, lease: Any) -> None:
    """A request longer than the lease TTL (a slow upload) keeps its slot while it lives."""
    period = max(1.0, limiter.lease_ttl_ms / 3000)
    while True:
        await asyncio.sleep(period)
        await limiter.renew(lease)


class RateLimitHeadersMiddleware:
    """Adds X-RateLimit-Limit/Remaining, set by `limit_request`, to whatever response the route returns."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                found = scope.get("state", {}).get(_STATE_KEY)
                if found:
                    present = {k.lower() for k, _ in message.get("headers", [])}
                    extra = [(k.lower().encode(), v.encode()) for k, v in found.items()
                             if k.lower().encode() not in present]
                    message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_limits)
