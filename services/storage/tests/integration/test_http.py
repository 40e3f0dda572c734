"""The fs backend's presigned URLs through the storage HTTP app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from timbre_storage.adapters.blob import FsBlobStore
from timbre_storage.adapters.http import build_http_app

KEY = "generations/acc1/2026/01/02/030405-job1.wav"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def setup(tmp_path: Path, clock: Clock) -> AsyncIterator[tuple[FsBlobStore, httpx.AsyncClient]]:
    store = FsBlobStore(tmp_path, "http://storage.test", b"k" * 32, clock=clock)
    await store.put(KEY, b"RIFF-audio", "audio/wav")
    await store.put("generations/acc1/2026/01/02/030405-job2.wav", b"RIFF-other", "audio/wav")
    transport = httpx.ASGITransport(app=build_http_app(store))
    async with httpx.AsyncClient(transport=transport, base_url="http://storage.test") as client:
        yield store, client


def parts(url: str) -> tuple[str, str, str]:
    split = urlsplit(url)
    query = parse_qs(split.query)
    return split.path, query["expires"][0], query["signature"][0]


async def test_good_url_serves_bytes(setup: tuple[FsBlobStore, httpx.AsyncClient]) -> None:
    store, client = setup
    url = await store.presign_get(KEY)
    assert url.startswith("http://storage.test/blobs/generations/acc1/")
    response = await client.get(url)
    assert response.status_code == 200
    assert response.content == b"RIFF-audio"
    assert response.headers["content-type"] == "audio/wav"


@pytest.mark.parametrize("tamper", ["key", "expires", "signature", "missing", "garbage_expiry"])
async def test_tampered_url_refused(setup: tuple[FsBlobStore, httpx.AsyncClient], tamper: str) -> None:
    store, client = setup
    path, expires, sig = parts(await store.presign_get(KEY))
    if tamper == "key":
        path = path.replace("job1", "job2")  # an existing object: only the signature guards it
    elif tamper == "expires":
        expires = str(int(expires) + 86400)
    elif tamper == "signature":
        sig = ("0" if sig[0] != "0" else "1") + sig[1:]
    url = f"{path}?expires={expires}&signature={sig}"
    if tamper == "missing":
        url = path
    elif tamper == "garbage_expiry":
        url = f"{path}?expires=-1&signature={sig}"
    response = await client.get(url)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "signature_invalid"
    assert "RIFF" not in response.text


async def test_expired_url_refused(setup: tuple[FsBlobStore, httpx.AsyncClient], clock: Clock) -> None:
    store, client = setup
    url = await store.presign_get(KEY, expires_in=60)
    clock.now += 59
    assert (await client.get(url)).status_code == 200
    clock.now += 1
    response = await client.get(url)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "url_expired"


async def test_missing_object_is_404(setup: tuple[FsBlobStore, httpx.AsyncClient]) -> None:
    store, client = setup
    url = await store.presign_get(KEY)
    await store.delete(KEY)
    response = await client.get(url)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "object_not_found"


async def test_traversal_in_path_never_reads_outside(setup: tuple[FsBlobStore, httpx.AsyncClient]) -> None:
    store, client = setup
    expires = int(store.now()) + 60
    key = "../../etc/passwd"
    response = await client.get(f"/blobs/{key}?expires={expires}&signature={store.signature(key, expires)}")
    assert response.status_code in (403, 404)
    assert "root:" not in response.text


async def test_healthz(setup: tuple[FsBlobStore, httpx.AsyncClient]) -> None:
    _, client = setup
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
