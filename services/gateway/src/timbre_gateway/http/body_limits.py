"""A per-route cap on request body size, enforced before any route, dependency or parser reads the body."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from timbre_common.logging import get_logger

from .errors import error_response
from .multipart import MAX_FIELD_BYTES, MAX_PARTS

log = get_logger(__name__)

MIB = 1024 * 1024
# Boundaries and part headers on top of the multipart reader's own cap, so its 422 file_too_large fires first.
MULTIPART_OVERHEAD_BYTES = 1 * MIB


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes its route's cap; an HTTPException so FastAPI's body parsing
    passes it through (it turns other errors into 400) and the error handlers answer 413 payload_too_large."""

    def __init__(self, limit: int) -> None:
        # Connection: close, so the server does not read the rest of the body to reuse the connection.
        super().__init__(413, f"the request body exceeds {_human(limit)}", headers={"Connection": "close"})
        self.limit = limit


@dataclass(frozen=True)
class BodyRule:
    method: str
    path: re.Pattern[str]
    max_bytes: int


@dataclass(frozen=True)
class BodyLimits:
    """The cap of the first rule matching a request's method and path, else `default_bytes`."""

    default_bytes: int
    rules: Sequence[BodyRule] = ()

    def limit_for(self, method: str, path: str) -> int:
        for rule in self.rules:
            if rule.method == method and rule.path.match(path):
                return rule.max_bytes
        return self.default_bytes


def _route(method: str, pattern: str, max_bytes: int) -> BodyRule:
    return BodyRule(method, re.compile(rf"^{pattern}/?$"), max_bytes)


def body_limits(settings: Any) -> BodyLimits:
    """The gateway's caps: JSON routes small, uploads sized by max_upload_bytes, the callback by its setting."""
    json_bytes = int(getattr(settings, "max_json_body_bytes", MIB))
    upload = int(getattr(settings, "max_upload_bytes", 20 * MIB)) + MAX_PARTS * MAX_FIELD_BYTES \
        + MULTIPART_OVERHEAD_BYTES
    callback = int(getattr(settings, "max_callback_body_bytes", 64 * MIB))
    webhook = int(getattr(settings, "max_webhook_body_bytes", MIB))
    return BodyLimits(default_bytes=json_bytes, rules=(
        _route("POST", "/v1/voices", upload),
        _route("POST", "/v1/uploads", upload),
        _route("POST", "/v1/jobs/[^/]+/complete", callback),
        _route("POST", "/v1/jobs/[^/]+/chunks", callback),
        _route("POST", "/v1/webhooks/stripe", webhook),
    ))


def _human(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB and n % MIB == 0 else f"{n} bytes"


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


class BodyLimitMiddleware:
    """Answers 413 when Content-Length passes the route's cap; counts a chunked body as it arrives and stops
    at the cap, so at most the cap plus one chunk is ever held, authenticated or not."""

    def __init__(self, app: ASGIApp, *, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.limit_for(scope["method"], scope["path"])
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            log.info("body_too_large", path=scope["path"], declared=declared, limit=limit)
            refused = BodyTooLarge(limit)
            await error_response(413, "payload_too_large", refused.detail,
                                 headers=refused.headers)(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            if received > limit:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    log.info("body_too_large", path=scope["path"], received=received, limit=limit)
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            # Normally the app's error handlers answer it; this catches one raised outside them.
            if started:
                raise
            await error_response(413, "payload_too_large", exc.detail, headers=exc.headers)(scope, receive, send)
