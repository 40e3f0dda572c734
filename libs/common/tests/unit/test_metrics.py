"""Metrics: route templates rather than paths, the bearer check, the metrics port."""
from __future__ import annotations

import socket

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from timbre_common import metrics
from timbre_common.settings import CommonSettings


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_bearer_check():
    assert metrics.authorized([], "")
    assert metrics.authorized([(b"authorization", b"Bearer s3cret")], "s3cret")
    assert metrics.authorized([(b"Authorization", b"bearer s3cret")], "s3cret")
    assert not metrics.authorized([(b"authorization", b"Bearer wrong")], "s3cret")
    assert not metrics.authorized([(b"authorization", b"Basic s3cret")], "s3cret")
    assert not metrics.authorized([], "s3cret")


async def test_requests_are_counted_by_route_template_not_raw_path():
    app = FastAPI()

    @app.get("/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    app.add_middleware(metrics.HttpMetricsMiddleware)
    before = sample("timbre_http_requests_total", method="GET", route="/things/{thing_id}", status="200")
    unmatched = sample("timbre_http_requests_total", method="GET", route="unmatched", status="404")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for n in range(3):
            assert (await client.get(f"/things/{n}")).status_code == 200
        assert (await client.get("/nowhere/at/all")).status_code == 404
    assert sample("timbre_http_requests_total", method="GET", route="/things/{thing_id}", status="200") == before + 3
    assert sample("timbre_http_requests_total", method="GET", route="unmatched", status="404") == unmatched + 1
    assert REGISTRY.get_sample_value("timbre_http_requests_total",
                                     {"method": "GET", "route": "/things/1", "status": "200"}) is None
    assert sample("timbre_http_request_duration_seconds_count", method="GET", route="/things/{thing_id}") >= 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("secret", ["", "metrics-bearer"])
async def test_metrics_port_serves_the_exposition_behind_its_secret(secret: str):
    port = _free_port()
    server = metrics.MetricsServer(host="127.0.0.1", port=port, secret=secret)
    await server.start()
    try:
        metrics.WEBHOOK_DELIVERIES.labels("job.ready", "delivered").inc()
        bearer = {"Authorization": f"Bearer {secret}"} if secret else {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            plain = await client.get("/metrics")
            authed = await client.get("/metrics", headers=bearer)
            elsewhere = await client.get("/", headers=bearer)
    finally:
        await server.stop()
    assert authed.status_code == 200
    assert authed.headers["content-type"].startswith("text/plain")
    assert 'timbre_webhook_deliveries_total{event="job.ready",outcome="delivered"}' in authed.text
    assert plain.status_code == (401 if secret else 200)
    if secret:
        assert plain.json()["error"]["code"] == "invalid_metrics_secret"
    assert elsewhere.status_code == 404


def test_a_metrics_port_off_loopback_needs_a_secret():
    assert CommonSettings(metrics_port=9101).metrics_host == "127.0.0.1"
    with pytest.raises(ValueError, match="METRICS_SECRET"):
        CommonSettings(metrics_port=9101, metrics_host="0.0.0.0")
    assert CommonSettings(metrics_port=9101, metrics_host="0.0.0.0", metrics_secret="a-real-bearer-token-1234")


def test_make_up_gives_each_service_a_metrics_port_and_says_where():
    from timbre_common.supervisor import SERVICES, metrics_banner, metrics_ports

    ports = metrics_ports(9100)
    assert set(ports) == set(SERVICES) - {"gateway"}
    assert len(set(ports.values())) == len(ports) and min(ports.values()) == 9101
    banner = metrics_banner("8000", ports)
    assert "http://127.0.0.1:8000/metrics (Authorization: Bearer $ADMIN_SECRET)" in banner
    assert all(f"http://127.0.0.1:{port}/metrics" in banner for port in ports.values())
    assert metrics_ports(0) == {} and "no metrics ports" in metrics_banner("8000", {})
