"""No input reaches a 500: a JSON body nested past any parser's recursion limit, sent to every route that takes a
body, is answered with a 4xx error body."""
from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from pydantic import SecretStr

from timbre_gateway.domain import mint_api_key
from timbre_gateway.http.app import create_app

KEY = mint_api_key()
ADMIN = "admin-secret-for-tests"
DEPTH = 200_000


class OneKey:
    async def authenticate(self, token: str) -> dict[str, Any] | None:
        if token != KEY:
            return None
        return {"account_id": uuid.UUID(int=1), "key_id": uuid.UUID(int=2), "rate_per_minute": None,
                "max_concurrent": None, "account_status": "active"}


class NoBus:
    """Nothing this hostile may get as far as another service."""

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a nested body reached an RPC: {args[:2]}")

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a nested body reached a publish")


def _app() -> Any:
    settings = SimpleNamespace(
        modal_callback_secret=SecretStr("callback-secret-for-tests-0123456789"), admin_secret=SecretStr(ADMIN),
        max_upload_bytes=1 << 22, max_json_body_bytes=1 << 22, max_callback_body_bytes=1 << 22,
        max_webhook_body_bytes=1 << 22, rate_limit_per_minute=1000, max_concurrent_requests=100,
        checkout_rate_per_minute=1000, max_text_chars=5000, idempotency_ttl_s=60)
    ctx = SimpleNamespace(settings=settings, accounts=OneKey(), limiter=None, bus=NoBus(), idempotency=None,
                          backends=SimpleNamespace(available=lambda: ["embedded"]), extras={})
    return create_app(ctx)


def _body_routes(app: Any) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        if not isinstance(route, APIRoute) or route.path.startswith("/v1/webhooks"):
            continue
        for method in sorted(route.methods & {"POST", "PUT", "PATCH"}):
            path = route.path
            for name in route.param_convertors:
                path = path.replace("{" + name + "}", str(uuid.uuid4()))
            out.append((method, path))
    return out


APP = _app()
ROUTES = _body_routes(APP)


def test_every_json_body_route_is_covered() -> None:
    paths = {p.rsplit("/", 1)[0] if p.count("-") >= 4 else p for _, p in ROUTES}
    assert {"/v1/checkout", "/v1/synthesize", "/v1/keys"} <= paths, ROUTES


@pytest.mark.parametrize("shape", ["array", "object"])
@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_a_deeply_nested_body_is_a_4xx(method: str, path: str, shape: str) -> None:
    body = "[" * DEPTH + "]" * DEPTH if shape == "array" else '{"a":' * DEPTH + "1" + "}" * DEPTH
    if "/complete" in path:
        body = '{"job_id": ' + body + "}"
    auth = ADMIN if "/admin" in path or path.startswith("/v1/keys") else KEY
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP, raise_app_exceptions=False),
                                 base_url="http://gw") as client:
        r = await client.request(method, path, content=body.encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {auth}"})
    assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text[:300])
    assert set(r.json()["error"]) >= {"code", "message"}
