"""An unavailable dependency answers 503 with Retry-After and names itself; health and readiness say which."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from aio_pika.exceptions import ChannelInvalidStateError
from pydantic import SecretStr

from timbre_common.contracts import Ping
from timbre_common.messaging import BrokerUnavailable, RemoteError, RpcTimeout
from timbre_gateway.adapters.backends import BackendRegistry
from timbre_gateway.adapters.dependencies import DependencyProbe
from timbre_gateway.http.app import create_app


class Accounts:
    """Authentication fails the way the dependency under test fails."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def authenticate(self, token: str) -> Any:
        raise self.exc


class Pool:
    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.queries = 0

    async def fetchval(self, sql: str) -> int:
        self.queries += 1
        if not self.up:
            raise ConnectionRefusedError("connection refused")
        return 1


class Bus:
    def __init__(self, connected: bool = True, down: tuple[str, ...] = ()) -> None:
        self.connected = connected
        self.down = down
        self.pinged: list[str] = []

    async def call(self, service: str, command: Any, *, timeout: float | None = None) -> Any:
        assert isinstance(command, Ping)
        self.pinged.append(service)
        if service in self.down:
            raise RpcTimeout(f"{service} did not answer")
        return None, None


def gateway(*, accounts: Any = None, pool: Pool | None = None, bus: Bus | None = None,
            backends: bool = True) -> httpx.AsyncClient:
    registry = BackendRegistry()
    if backends:
        registry._seen["w1"] = (registry.clock(), 60.0, ["embedded"])
    probe = DependencyProbe(pool=pool, bus=bus) if pool is not None and bus is not None else None
    settings = SimpleNamespace(admin_secret=SecretStr("admin"), max_upload_bytes=1 << 20,
                               max_json_body_bytes=1 << 20, max_callback_body_bytes=1 << 20,
                               max_webhook_body_bytes=1 << 20, modal_callback_secret=SecretStr("s"))
    ctx = SimpleNamespace(settings=settings, accounts=accounts, limiter=None, bus=bus, backends=registry, probe=probe)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx), raise_app_exceptions=False),
                             base_url="http://gw")


@pytest.mark.parametrize(("exc", "dependency"), [
    (ChannelInvalidStateError("No active transport in channel"), "broker"),
    (BrokerUnavailable("the broker connection is down"), "broker"),
    (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"), "database"),
    (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), "database"),
    (RemoteError("service_unavailable", "voices: database unavailable", status=503,
                 details={"dependency": "database"}), "database"),
    (RpcTimeout("voices did not answer voices.get within 30s"), "service"),
])
async def test_an_unreachable_dependency_is_503_with_retry_after_never_500(exc: BaseException, dependency: str):
    async with gateway(accounts=Accounts(exc)) as http:
        r = await http.get("/v1/voices", headers={"Authorization": "Bearer tb_" + "x" * 30})
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "5"
    error = r.json()["error"]
    assert error["code"] == "service_unavailable"
    assert error["details"]["dependency"] == dependency


async def test_a_real_bug_is_still_500():
    async with gateway(accounts=Accounts(KeyError("oops"))) as http:
        r = await http.get("/v1/voices", headers={"Authorization": "Bearer tb_" + "x" * 30})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"


async def test_health_is_ok_and_ready_when_everything_answers():
    bus = Bus()
    async with gateway(pool=Pool(), bus=bus) as http:
        health = (await http.get("/v1/health")).json()
        ready = await http.get("/v1/ready")
    assert health["status"] == "ok" and health["failing"] == []
    assert set(health["dependencies"].values()) == {"ok"}
    assert sorted(bus.pinged) == ["billing", "dispatcher", "storage", "voices"]
    assert ready.status_code == 200 and ready.json()["ready"] is True


async def test_health_names_a_service_that_does_not_answer_but_the_gateway_stays_ready():
    async with gateway(pool=Pool(), bus=Bus(down=("voices",))) as http:
        health = (await http.get("/v1/health")).json()
        ready = await http.get("/v1/ready")
    assert health["status"] == "degraded" and health["failing"] == ["voices"]
    assert health["dependencies"]["voices"].startswith("down")
    assert ready.status_code == 200


@pytest.mark.parametrize(("pool", "bus", "failing"), [
    (Pool(up=False), Bus(), ["database"]),
    (Pool(), Bus(connected=False), ["broker", "voices", "dispatcher", "storage", "billing"]),
])
async def test_without_its_database_or_broker_the_gateway_is_degraded_and_not_ready(pool, bus, failing):
    async with gateway(pool=pool, bus=bus) as http:
        health = (await http.get("/v1/health")).json()
        ready = await http.get("/v1/ready")
    assert health["status"] == "degraded" and health["failing"] == failing
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert ready.headers["Retry-After"] == "5"


async def test_no_backend_is_degraded():
    async with gateway(pool=Pool(), bus=Bus(), backends=False) as http:
        health = (await http.get("/v1/health")).json()
    assert health["status"] == "degraded" and health["failing"] == ["backends"]


async def test_probes_are_cached_briefly():
    pool = Pool()
    async with gateway(pool=pool, bus=Bus()) as http:
        for _ in range(5):
            await http.get("/v1/ready")
    assert pool.queries == 1


def test_a_backend_whose_workers_just_stopped_beating_is_an_outage_not_a_refusal():
    now = [1000.0]
    registry = BackendRegistry(grace=3.0, clock=lambda: now[0], warmup_s=0)
    assert not registry.recently_lost("embedded")  # never seen: this deployment lacks it
    registry._seen["w1"] = (now[0], 1.0, ["embedded"])
    assert not registry.recently_lost("embedded") and not registry.known_unavailable("embedded")
    now[0] += 10  # its worker was restarting
    assert registry.recently_lost("embedded") and registry.known_unavailable("embedded")
    now[0] += 3600  # gone for good
    assert not registry.recently_lost("embedded")
