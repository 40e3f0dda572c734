"""The completion callback takes a token per job attempt: a stale attempt's callback changes nothing, and a
placeholder callback secret stops the gateway at start outside development."""
from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from timbre_common.callback_tokens import callback_token
from timbre_common.contracts.synthesis import JobOwner, SynthesisFailed
from timbre_gateway.http.app import create_app
from timbre_gateway.settings import GatewaySettings

SECRET = "a-real-callback-secret-0123456789abcdef"
JOB = "6f0b5a8e-7c1d-4f2a-9b3e-2d4c6a8e0f11"


class Bus:
    def __init__(self, attempt: int) -> None:
        self.attempt, self.published = attempt, []

    async def call(self, service: str, command: Any, **_: Any) -> tuple[Any, None]:
        return JobOwner(job_id=JOB, account_id="a1", voice_id="v1", backend="qwen3-0.6b", status="pending",
                        created_at=datetime.now(UTC), attempt=self.attempt), None

    async def publish(self, event: Any, **_: Any) -> None:
        self.published.append(event)


def _client(bus: Bus) -> httpx.AsyncClient:
    settings = SimpleNamespace(modal_callback_secret=SecretStr(SECRET), admin_secret=SecretStr("admin"),
                               max_upload_bytes=1 << 20, max_json_body_bytes=1 << 20,
                               max_callback_body_bytes=1 << 20, max_webhook_body_bytes=1 << 20)
    ctx = SimpleNamespace(settings=settings, accounts=None, limiter=None, bus=bus)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://gw")


async def _report(client: httpx.AsyncClient, attempt: int) -> httpx.Response:
    return await client.post(f"/v1/jobs/{JOB}/complete?attempt={attempt}",
                             json={"job_id": JOB, "error": "out of memory", "error_code": "backend_error"},
                             headers={"Authorization": f"Bearer {callback_token(SECRET, JOB, attempt)}"})


async def test_a_stale_attempts_callback_is_ignored_and_the_current_one_counts() -> None:
    bus = Bus(attempt=2)
    async with _client(bus) as client:
        stale = await _report(client, 1)
        assert stale.status_code == 200 and stale.json() == {"status": "ignored"}, stale.text
        assert bus.published == []
        current = await _report(client, 2)
    assert current.status_code == 200 and current.json() == {"status": "accepted"}, current.text
    [failed] = bus.published
    assert isinstance(failed, SynthesisFailed) and failed.attempt == 2 and failed.job_id == JOB


@pytest.mark.parametrize("value", ["changeme", "<callback-secret>", "xxxx", "short-secret"])
def test_a_placeholder_callback_secret_is_refused_outside_dev(value: str) -> None:
    with pytest.raises(ValidationError, match="MODAL_CALLBACK_SECRET"):
        GatewaySettings(timbre_env="prod", admin_secret=SECRET, modal_callback_secret=value)
    # Development keeps its defaults; unset means the callback route refuses everything.
    assert GatewaySettings(timbre_env="dev", modal_callback_secret=value)
    assert GatewaySettings(timbre_env="prod", admin_secret=SECRET, modal_callback_secret="")
