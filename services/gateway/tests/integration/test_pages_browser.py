"""Signup and success pages in headless Chromium, under their own CSP, served from loopback."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from timbre_common.testing import LoopbackServer, headless_dom
from timbre_gateway.http.pages import security_headers, signup_page, success_page

KEY = "tk_live_<b>not-html</b>_0123456789"


@pytest.fixture
def serve() -> Iterator[Callable[[Any], str]]:
    """Start an ASGI app on loopback for the test; returns its base URL."""
    servers: list[LoopbackServer] = []

    def _serve(app: Any) -> str:
        servers.append(LoopbackServer(app).start())
        return servers[-1].url

    yield _serve
    for server in servers:
        server.stop()


def _pages_app(polls: list[str], answers: list[dict[str, Any]]) -> FastAPI:
    """The pages, and a JSON poll that answers `answers` in turn (the last one from then on)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    headers = security_headers()

    @app.get("/v1/signup")
    async def signup() -> HTMLResponse:
        return HTMLResponse(signup_page(), headers=headers)

    @app.get("/v1/checkout/success")
    async def success(token: str, request: Request) -> Any:
        if "application/json" not in request.headers.get("accept", ""):
            return HTMLResponse(success_page(token), headers=headers)
        polls.append(token)
        return JSONResponse(answers[min(len(polls), len(answers)) - 1])

    return app


def test_signup_page_renders_the_form(serve: Callable[[Any], str], tmp_path: Path) -> None:
    base = serve(_pages_app([], [{"ready": False}]))
    dom = headless_dom(f"{base}/v1/signup", tmp_path / "profile")
    assert '<form id="signup"' in dom and 'type="email"' in dom and "Continue to payment" in dom


def test_success_page_polls_then_shows_the_key_once(serve: Callable[[Any], str], tmp_path: Path) -> None:
    polls: list[str] = []
    # Not ready for the first two polls (webhook pending), then the key once, then "already shown".
    answers = [{"ready": False}, {"ready": False}, {"ready": True, "api_key": KEY},
               {"ready": True, "already_shown": True}]
    base = serve(_pages_app(polls, answers))
    token = "tok&<x>"
    dom = headless_dom(f"{base}/v1/checkout/success?token=tok%26%3Cx%3E", tmp_path / "profile", budget_ms=8000)
    assert polls[:3] == [token, token, token], polls  # the token survives escaping and URL encoding
    assert len(polls) == 3  # it stops polling once the key is shown
    # textContent, not innerHTML: the key's markup stays text.
    assert '<code id="api-key">tk_live_&lt;b&gt;not-html&lt;/b&gt;_0123456789</code>' in dom
    assert '<div id="key-box">' in dom and 'id="copy"' in dom and "shown only once" in dom


def test_success_page_says_when_the_key_expired(serve: Callable[[Any], str], tmp_path: Path) -> None:
    polls: list[str] = []
    base = serve(_pages_app(polls, [{"ready": False}, {"ready": True, "expired": True}]))
    dom = headless_dom(f"{base}/v1/checkout/success?token=late", tmp_path / "profile", budget_ms=5000)
    assert polls == ["late", "late"]  # it stops polling at the answer
    assert "expired before it was collected" in dom and '<div id="key-box" hidden="">' in dom
