"""End-to-end: every service as a process on a fresh database and bus namespace, driven over HTTP."""
from __future__ import annotations

import asyncio
import io
import json
import secrets
import select
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import httpx
import pytest

from timbre_common.supervisor import CORE_SERVICES, Platform, drop_database, ensure_database
from timbre_common.testing import load_module

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "e2e-admin-" + secrets.token_hex(16)
CALLBACK_SECRET = "e2e-callback-" + secrets.token_hex(16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """A client of the running platform, with helpers for the common flows."""

    def __init__(self, base_url: str, platform: Platform, env: dict[str, str] | None = None) -> None:
        self.base_url = base_url
        self.platform = platform
        self.env = env or {}
        self.http = httpx.Client(base_url=base_url, timeout=60)
        # Where each service's Prometheus metrics are (the gateway's behind the admin secret).
        self.metrics_urls: dict[str, str] = {"gateway": f"{base_url}/metrics"}

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN}"}

    def new_key(self, **body: object) -> dict:
        r = self.http.post("/v1/keys", json=body or {"label": "e2e"}, headers=self.admin())
        assert r.status_code == 201, r.text
        return r.json()

    @staticmethod
    def auth(key: dict | str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key['api_key'] if isinstance(key, dict) else key}"}

    def create_voice(self, key: dict, wav: bytes, *, name: str = "me", **fields: str) -> httpx.Response:
        return self.http.post("/v1/voices", headers=self.auth(key), data={"name": name, **fields},
                              files={"ref_audio": ("ref.wav", io.BytesIO(wav), "audio/wav")})

    def wait_job(self, key: dict, job_id: str, timeout: float = 120.0, until=("ready", "failed")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.http.get(f"/v1/jobs/{job_id}", headers=self.auth(key))
            assert r.status_code == 200, r.text
            if r.json()["status"] in until:
                return r.json()
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} not {until} within {timeout}s; last: {r.json()}\n{self.tail_logs()}")

    def sql(self, query: str, *args: object) -> list:
        """Run one statement on the platform's database (to look at, or age, what the services keep)."""
        import asyncpg

        async def run() -> list:
            conn = await asyncpg.connect(self.env["DATABASE_URL"])
            try:
                return await conn.fetch(query, *args)
            finally:
                await conn.close()

        return asyncio.run(run())

    def scrape(self, service: str) -> dict[tuple[str, frozenset], float]:
        """One scrape of a service's /metrics: {(sample name, labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        r = httpx.get(self.metrics_urls[service], headers=self.admin() if service == "gateway" else {}, timeout=30)
        assert r.status_code == 200, f"{service}: {r.status_code} {r.text[:200]}"
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(r.text) for s in family.samples}

    def tail_logs(self, lines: int = 15) -> str:
        out = []
        for name in self.platform.processes:
            text = self.platform.log(name).strip().splitlines()[-lines:]
            out.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(out)


def send_chunked(client: Client, path: str, pieces: Iterable[bytes],
                 headers: dict[str, str]) -> tuple[int, dict, int, bool]:
    """POST `pieces` chunked over a raw socket (no Content-Length), stopping as soon as an answer arrives.

    Returns (status, JSON body, bytes sent, whether every piece was sent): what a refusal while streaming
    looks like from the client's side.
    """
    url = urlparse(client.base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\n{lines}"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    sent, finished = 0, False
    try:
        for piece in pieces:
            if select.select([sock], [], [], 0)[0]:
                break  # answered already
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
        else:
            sock.sendall(b"0\r\n\r\n")
            finished = True
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the server stopped reading and closed: its answer is waiting
    response, deadline = b"", time.monotonic() + 10
    while (b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}")) and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        response += chunk
    sock.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), response[:500]
    return int(head.split(b" ")[1]), json.loads(body[body.index(b"{"):]), sent, finished


def wait_healthy(client: Client, *, backend: str = "embedded", timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        dead = client.platform.exited()
        if dead:
            raise AssertionError(f"services exited: {dead}\n{client.tail_logs(40)}")
        try:
            last = client.http.get("/v1/health")
            if last.status_code == 200 and backend in last.json()["backends"]:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"platform not healthy within {timeout}s: {last and last.text}\n{client.tail_logs(40)}")


@contextmanager
def running_platform(database_url: str, amqp_url: str, root: Path, *, overrides: dict[str, str] | None = None,
                     extra_workers: dict[str, dict[str, str]] | None = None,
                     wait_for_backend: str = "embedded") -> Iterator[Client]:
    """Every service as a process on a fresh database and bus namespace; torn down on exit.

    `overrides` changes the environment of every service; `extra_workers` starts more gpu_worker processes
    (name -> environment overrides), e.g. one running a Qwen3 backend.
    """
    parsed = urlparse(database_url)
    db_url = urlunparse(parsed._replace(path=f"/timbre_e2e_{uuid.uuid4().hex[:10]}"))
    asyncio.run(ensure_database(db_url))
    gateway_port, storage_port = _free_port(), _free_port()
    env = {
        "TIMBRE_ENV": "test",
        "DATABASE_URL": db_url,
        "AMQP_URL": amqp_url,
        "BUS_NAMESPACE": f"e2e{uuid.uuid4().hex[:8]}",
        "PORT": str(gateway_port),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{gateway_port}",
        "ADMIN_SECRET": ADMIN,
        "MODAL_CALLBACK_SECRET": CALLBACK_SECRET,
        "STORAGE_BACKEND": "fs",
        "STORAGE_ROOT": str(root / "blobs"),
        "STORAGE_PUBLIC_URL": f"http://127.0.0.1:{storage_port}",
        "STORAGE_SIGNING_KEY": secrets.token_hex(32),
        "SWEEP_INTERVAL_S": "1",
        "BILLING": "off",
        "BACKENDS": "embedded",
        "HEARTBEAT_INTERVAL_S": "1",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
        **(overrides or {}),
    }
    platform = Platform(env=env, log_dir=root / "logs")
    # An override of PORT (a test that must know the URL before start, e.g. for APP_BASE_URL) is honoured.
    client = Client(f"http://127.0.0.1:{env['PORT']}", platform, env=env)
    for name in CORE_SERVICES:
        if name != "gateway":
            port = _free_port()
            platform.extra_env[name] = {"METRICS_PORT": str(port)}
            client.metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
    try:
        platform.start_all()
        for name, worker_env in (extra_workers or {}).items():
            platform.start_extra(name, "timbre_gpu_worker", worker_env)
        wait_healthy(client, backend=wait_for_backend)
        yield client
    finally:
        client.http.close()
        platform.stop_all()
        asyncio.run(drop_database(db_url))
        asyncio.run(_delete_namespace(amqp_url, env["BUS_NAMESPACE"]))


async def _delete_namespace(amqp_url: str, namespace: str) -> None:
    import aio_pika

    from timbre_common.messaging import Names
    from timbre_common.messaging.topology import delete_topology

    conn = await aio_pika.connect(amqp_url)
    await delete_topology(await conn.channel(), Names(namespace))
    await conn.close()


@pytest.fixture(scope="session")
def client(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """The default platform (fs storage, billing off, the embedded backend), shared by the session."""
    with running_platform(database_url, amqp_url, tmp_path_factory.mktemp("platform")) as c:
        yield c


@pytest.fixture(scope="session")
def wavs():  # type: ignore[no-untyped-def]
    """The hostile-WAV corpus module of libs/common's tests (valid_wav, hostile_wavs)."""
    return load_module("timbre_hostile_wavs", ROOT / "libs/common/tests/hostile_wavs.py")
