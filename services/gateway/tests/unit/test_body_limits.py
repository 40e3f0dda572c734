"""Request body caps before authentication, the multipart budget, and the callback's secret-before-body order.

Each hostile body is a generator that counts what it yielded: the ASGI transport pulls a chunk only when the
app calls `receive`, so the count is what the gateway consumed (and could have held) before answering.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import SecretStr

from timbre_common.callback_tokens import callback_token
from timbre_gateway.http.app import create_app
from timbre_gateway.http.body_limits import BodyLimitMiddleware, body_limits
from timbre_gateway.http.errors import install_error_handlers
from timbre_gateway.http.multipart import MAX_FIELD_BYTES, MAX_PARTS, read_form

MIB = 1024 * 1024
CHUNK = 64 * 1024
SECRET = "callback-secret-for-tests"
MAX_UPLOAD = 20 * MIB


class Counted:
    """An async body of `total` bytes in CHUNK pieces (after an optional head) that counts what was pulled."""

    def __init__(self, total: int, head: bytes = b"", fill: bytes = b"\x00") -> None:
        self.total, self.head, self.fill, self.yielded = total, head, fill, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.head:
            self.yielded += len(self.head)
            yield self.head
        piece = self.fill * (CHUNK // len(self.fill))
        while self.yielded < self.total:
            self.yielded += len(piece)
            yield piece


class NoAccounts:
    async def authenticate(self, token: str) -> None:
        raise AssertionError("authentication must not be reached")


def settings(**overrides: Any) -> SimpleNamespace:
    values = {"modal_callback_secret": SecretStr(SECRET), "admin_secret": SecretStr("admin"),
              "max_upload_bytes": MAX_UPLOAD, "max_json_body_bytes": MIB, "max_callback_body_bytes": 4 * MIB,
              "max_webhook_body_bytes": MIB}
    return SimpleNamespace(**(values | overrides))


def gateway(**overrides: Any) -> httpx.AsyncClient:
    """The real gateway app (routes, error handlers, middleware) over a context that must not be reached."""
    ctx = SimpleNamespace(settings=settings(**overrides), accounts=NoAccounts(), limiter=None, bus=None)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://gw")


def form_app() -> httpx.AsyncClient:
    """A route that reads a form the way POST /v1/voices does, behind the gateway's body caps."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/voices")
    async def voices(request: Request) -> dict[str, Any]:
        form = await read_form(request, file_fields={"ref_audio"}, max_file_bytes=MAX_UPLOAD)
        return {"fields": form.fields, "files": {k: len(v.data) for k, v in form.files.items()}}

    app.add_middleware(BodyLimitMiddleware, limits=body_limits(settings()))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]) <= {"code", "message", "details"}
    assert body["error"]["code"] == code and body["error"]["message"], body


JSON = {"content-type": "application/json"}


# The body cap -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/synthesize", "/v1/checkout", "/v1/keys", "/v1/jobs/j1/complete?attempt=1"])
async def test_chunked_300mib_json_body_is_refused_at_the_cap(path: str) -> None:
    body = Counted(300 * MIB, head=b'{"text": "')
    callback = "/complete" in path
    headers = JSON | ({"authorization": f"Bearer {callback_token(SECRET, 'j1', 1)}"} if callback else {})
    async with gateway() as client:
        response = await client.post(path, content=body, headers=headers)
    assert_error(response, 413, "payload_too_large")
    cap = 4 * MIB if callback else MIB
    assert body.yielded <= cap + CHUNK + len(body.head), body.yielded


async def test_declared_oversized_body_is_refused_without_reading_it() -> None:
    body = Counted(300 * MIB)
    async with gateway() as client:
        response = await client.post("/v1/synthesize", content=body,
                                     headers=JSON | {"content-length": str(300 * MIB)})
    assert_error(response, 413, "payload_too_large")
    assert body.yielded == 0


async def test_stripe_webhook_stops_at_one_mib() -> None:
    body = Counted(50 * MIB)
    async with gateway() as client:
        response = await client.post("/v1/webhooks/stripe", content=body, headers={"stripe-signature": "t=1,v1=x"})
    assert_error(response, 413, "payload_too_large")
    assert body.yielded <= MIB + CHUNK


async def test_a_body_under_the_cap_still_reaches_the_route() -> None:
    """Just under the cap: parsed as usual, so the caller learns about auth, not size."""
    padding = "x" * (MIB - 100)
    async with gateway() as client:
        response = await client.post("/v1/synthesize", json={"voice_id": "v", "text": padding})
    assert_error(response, 401, "missing_api_key")


# The completion callback ------------------------------------------------------------------------------
async def test_callback_without_its_token_is_401_and_its_body_is_never_read() -> None:
    token = callback_token(SECRET, "j1", 1)
    refused = [("/v1/jobs/j1/complete?attempt=1", {}),
               ("/v1/jobs/j1/complete?attempt=1", {"authorization": "Bearer x"}),
               # The secret itself is no longer a credential: only the token of this job and attempt is.
               ("/v1/jobs/j1/complete?attempt=1", {"authorization": f"Bearer {SECRET}"}),
               ("/v1/jobs/j1/complete", {"authorization": f"Bearer {token}"}),
               ("/v1/jobs/j1/complete?attempt=2", {"authorization": f"Bearer {token}"}),
               ("/v1/jobs/j1/complete?attempt=abc", {"authorization": f"Bearer {token}"}),
               ("/v1/jobs/j2/complete?attempt=1", {"authorization": f"Bearer {token}"})]
    for path, auth in refused:
        body = Counted(10 * MIB, head=b"not json at all")
        async with gateway() as client:
            response = await client.post(path, content=body, headers=JSON | auth)
        assert_error(response, 401, "invalid_callback_token")
        assert response.headers["www-authenticate"] == "Bearer"
        assert body.yielded == 0


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_body"),
    (b"{}", 400, "missing_field"),
    (json.dumps({"job_id": "j1", "synthesis_ms": -5}).encode(), 422, "invalid_request"),
    (json.dumps({"job_id": "j1", "audio_seconds": -1.0}).encode(), 422, "invalid_request"),
    (b'{"job_id": "j1", "rtf": 1e999}', 422, "invalid_request"),
    (json.dumps({"job_id": "other", "error": "x"}).encode(), 400, "job_id_mismatch"),
])
async def test_callback_body_errors_use_the_error_body(body: bytes, status: int, code: str) -> None:
    async with gateway() as client:
        response = await client.post("/v1/jobs/j1/complete?attempt=1", content=body,
                                     headers=JSON | {"authorization": f"Bearer {callback_token(SECRET, 'j1', 1)}"})
    assert_error(response, status, code)


async def test_callback_documents_its_body() -> None:
    async with gateway() as client:
        spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/v1/jobs/{job_id}/complete"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["job_id"] and "wav_b64" in schema["properties"]
    assert "413" in operation["responses"]


# Multipart --------------------------------------------------------------------------------------------
BOUNDARY = "testboundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def part(name: str, data: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


class Parts:
    """A chunked multipart body of `count` file parts of `size` bytes each, counting what was pulled."""

    def __init__(self, names: list[str], size: int, filename: str | None = "f.wav") -> None:
        self.names, self.size, self.filename, self.yielded = names, size, filename, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for name in self.names:
            for piece in [part(name, b"", self.filename)[:-2]] + [b"\x01" * CHUNK] * (self.size // CHUNK) + [b"\r\n"]:
                self.yielded += len(piece)
                yield piece
        yield f"--{BOUNDARY}--\r\n".encode()


class Nameless:
    """`count` parts of `size` bytes with no name (so never kept), counting what was pulled."""

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size, self.yielded = count, size, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            head = f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\n".encode()
            for piece in [head] + [b"\x01" * CHUNK] * (self.size // CHUNK) + [b"\r\n"]:
                self.yielded += len(piece)
                yield piece
        yield f"--{BOUNDARY}--\r\n".encode()


async def test_thirty_19mib_file_parts_are_refused_after_the_first() -> None:
    """The attack that held 1239 MB: the second file part is refused at its headers."""
    for names in (["ref_audio"] * 30, ["ref_audio"] + [f"extra{i}" for i in range(29)]):
        body = Parts(names, 19 * MIB)
        async with form_app() as client:
            response = await client.post("/v1/voices", content=body, headers=MULTIPART)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] in {"duplicate_field", "unexpected_file"}
        assert body.yielded <= 19 * MIB + 4 * CHUNK, body.yielded / MIB


async def test_unexpected_file_part_is_refused_before_it_is_buffered() -> None:
    body = Parts(["name"], 19 * MIB)
    async with form_app() as client:
        response = await client.post("/v1/voices", content=body, headers=MULTIPART)
    assert_error(response, 400, "unexpected_file")
    assert body.yielded <= 2 * CHUNK


async def test_whole_body_budget_applies_across_parts() -> None:
    """Parts that are not kept (no name) still count: the body stops at the file cap plus the fields' allowance."""
    body = Nameless(3, 19 * MIB)
    async with form_app() as client:
        response = await client.post("/v1/voices", content=body, headers=MULTIPART)
    assert_error(response, 422, "file_too_large")
    budget = MAX_UPLOAD + MAX_PARTS * MAX_FIELD_BYTES
    assert budget < body.yielded <= budget + 2 * CHUNK


async def test_file_just_over_the_limit_gets_the_multipart_422_not_the_413() -> None:
    body = Parts(["ref_audio"], MAX_UPLOAD + CHUNK)
    async with form_app() as client:
        response = await client.post("/v1/voices", content=body, headers=MULTIPART)
    assert_error(response, 422, "file_too_large")
    assert body.yielded <= MAX_UPLOAD + 3 * CHUNK


async def test_duplicate_field_is_refused() -> None:
    content = part("name", b"first") + part("name", b"second") + f"--{BOUNDARY}--\r\n".encode()
    async with form_app() as client:
        response = await client.post("/v1/voices", content=content, headers=MULTIPART)
    assert_error(response, 400, "duplicate_field")


async def test_a_normal_form_is_read() -> None:
    content = (part("name", b"mine") + part("ref_text", b"hello") + part("ref_audio", b"RIFF" * 10, "r.wav")
               + f"--{BOUNDARY}--\r\n".encode())
    async with form_app() as client:
        response = await client.post("/v1/voices", content=content, headers=MULTIPART)
    assert response.status_code == 200, response.text
    assert response.json() == {"fields": {"name": "mine", "ref_text": "hello"}, "files": {"ref_audio": 40}}
