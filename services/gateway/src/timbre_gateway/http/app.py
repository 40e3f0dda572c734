"""The FastAPI application: routes, error bodies, correlation ids, OpenAPI."""
from __future__ import annotations

import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from timbre_common import metrics
from timbre_common.catalogue import KNOWN_BACKENDS
from timbre_common.logging import correlation_id_var, get_logger
from timbre_common.tracing import HttpTracingMiddleware

from .body_limits import BodyLimitMiddleware, body_limits
from .deps import AdminDep, Ctx
from .errors import document_error_body, install_error_handlers
from .limits import RateLimitHeadersMiddleware
from .routes import router
from .routes_billing import router as billing_router
from .routes_openai import router as openai_router
from .routes_stream import router as stream_router
from .routes_webhooks import router as webhooks_router

log = get_logger("timbre_gateway.access")
_CID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

DESCRIPTION = """Timbre: hosted voice-cloning text-to-speech.

Authenticate with `Authorization: Bearer tb_...`. Every error answers
`{"error": {"code": "...", "message": "..."}}` with a stable code.
Synthesis answers `200 audio/*` from the cache (`X-Cache: HIT`) or `202` with a job to poll (`X-Cache: MISS`).
Each key has a rate limit (requests per minute) and a limit of requests in flight, shared by every replica:
past either the answer is `429` with `Retry-After`; `X-RateLimit-Limit`/`X-RateLimit-Remaining` come with each
answer. `POST /v1/voices` and `POST /v1/synthesize` take an `Idempotency-Key` header: a retry gets the first
answer back (`Idempotent-Replayed: true`) and creates nothing new.
"""


class CorrelationMiddleware:
    """Takes X-Request-Id (or makes one), binds it for logs and messages, echoes it back; logs each request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        cid = given if _CID_RE.match(given) else str(uuid.uuid4())
        token = correlation_id_var.set(cid)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", cid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("http_request", method=scope["method"], path=scope["path"], status=status["code"],
                     ms=round((time.perf_counter() - started) * 1000, 2))
            correlation_id_var.reset(token)


async def prometheus_metrics(ctx: Ctx, _: AdminDep) -> Response:
    """Prometheus exposition of this gateway process (admin secret as a bearer token)."""
    available = set(ctx.backends.available())
    for backend in KNOWN_BACKENDS:
        metrics.BACKEND_AVAILABLE.labels(backend).set(1 if backend in available else 0)
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


def create_app(ctx: Any, *, extra_routers: list[Any] | None = None) -> FastAPI:
    """The gateway app over a built context (settings, bus, repositories)."""
    app = FastAPI(title="Timbre API", version="1.0.0", description=DESCRIPTION, openapi_url="/openapi.json",
                  docs_url="/docs", redoc_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)
    document_error_body(app)
    app.include_router(router)
    app.include_router(billing_router)
    app.include_router(webhooks_router)
    app.include_router(stream_router)
    app.include_router(openai_router)
    for extra in extra_routers or []:
        app.include_router(extra)
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"], include_in_schema=False)
    app.add_middleware(RateLimitHeadersMiddleware)
    # Inside the correlation middleware, so a refused body is logged with its request id.
    app.add_middleware(BodyLimitMiddleware, limits=body_limits(ctx.settings))
    app.add_middleware(metrics.HttpMetricsMiddleware)
    app.add_middleware(CorrelationMiddleware)
    # Outermost: the access log line of CorrelationMiddleware is written inside the request's span.
    app.add_middleware(HttpTracingMiddleware)
    return app
