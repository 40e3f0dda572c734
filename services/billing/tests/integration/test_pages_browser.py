"""Signup and success pages in headless Chromium, under their own CSP, served from loopback."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from timbre_billing.pages import security_headers, signup_page, success_page

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
KEY = "tk_live_<b>not-html</b>_0123456789"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if IN_CI:
        pytest.fail("chromium is missing in CI: requirements/apt.txt lists it")
    pytest.skip("chromium not installed (apt-get install -y chromium)")


def _dump_dom(url: str, profile: Path, budget_ms: int = 0) -> str:
    args = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]
    if budget_ms:
        args.append(f"--virtual-time-budget={budget_ms}")
    done = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _pages_app(polls: list[str]) -> FastAPI:
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
        # Not ready for the first two polls (webhook pending), then the key once, then "already shown".
        if len(polls) <= 2:
            return JSONResponse({"ready": False})
        if len(polls) == 3:
            return JSONResponse({"ready": True, "api_key": KEY})
        return JSONResponse({"ready": True, "api_key": None})

    return app


def test_signup_page_renders_the_form(serve: Any, tmp_path: Path) -> None:
    base = serve(_pages_app([]))
    dom = _dump_dom(f"{base}/v1/signup", tmp_path / "profile")
    assert '<form id="signup"' in dom and 'type="email"' in dom and "Continue to payment" in dom


def test_success_page_polls_then_shows_the_key_once(serve: Any, tmp_path: Path) -> None:
    polls: list[str] = []
    base = serve(_pages_app(polls))
    token = "tok&<x>"
    dom = _dump_dom(f"{base}/v1/checkout/success?token=tok%26%3Cx%3E", tmp_path / "profile", budget_ms=8000)
    assert polls[:3] == [token, token, token], polls  # the token survives escaping and URL encoding
    assert len(polls) == 3  # it stops polling once the key is shown
    # textContent, not innerHTML: the key's markup stays text.
    assert '<code id="api-key">tk_live_&lt;b&gt;not-html&lt;/b&gt;_0123456789</code>' in dom
    assert '<div id="key-box">' in dom and 'id="copy"' in dom and "shown only once" in dom
