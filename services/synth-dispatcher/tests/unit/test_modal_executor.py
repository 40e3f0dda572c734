"""The Modal executor's spawners and its work-order handler, with fakes."""
from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from timbre_common.contracts.synthesis import SynthesisRequested
from timbre_common.testing import envelope
from timbre_dispatcher.adapters import modal_executor
from timbre_dispatcher.adapters.modal_executor import HttpSpawner, ModalSpawner, SpawnRefused, spawn_work_order
from timbre_dispatcher.bootstrap import spawner_for
from timbre_dispatcher.settings import DispatcherSettings

ORDER = SynthesisRequested(job_id="j1", account_id="a1", voice_id="v1", text="Hi.", lang="en", backend="qwen3-0.6b",
                           cache_key="k")


class FakeJobs:
    def __init__(self, status: str = "pending", attempts: int = 1) -> None:
        self.status = status
        self.attempts = attempts
        self.refs: dict[str, str] = {}

    async def get(self, job_id: str) -> dict[str, Any] | None:
        return {"job_id": job_id, "status": self.status, "attempts": self.attempts}

    async def set_executor_ref(self, job_id: str, ref: str) -> None:
        self.refs[job_id] = ref


class RecordingSpawner:
    def __init__(self, error: Exception | None = None) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.error = error

    async def spawn(self, payload: dict[str, Any]) -> str:
        self.payloads.append(payload)
        if self.error:
            raise self.error
        return "call-1"


def _settings(**kw: Any) -> DispatcherSettings:
    return DispatcherSettings(executor="modal", modal_callback_secret="s" * 32, **kw)


def test_modal_is_the_default_spawner_and_a_spawn_url_selects_http():
    assert isinstance(spawner_for(_settings()), ModalSpawner)
    http = spawner_for(_settings(modal_spawn_url="http://127.0.0.1:9/spawn"))
    assert isinstance(http, HttpSpawner) and http.url == "http://127.0.0.1:9/spawn"


async def test_a_pending_job_is_spawned_with_its_callback_and_the_call_remembered():
    spawner, jobs = RecordingSpawner(), FakeJobs()
    await spawn_work_order(ORDER, envelope=envelope(), spawner=spawner, jobs=jobs,
                           public_base_url="https://api.example/", callback_secret="cb-secret")
    [payload] = spawner.payloads
    assert payload["job_id"] == "j1" and payload["backend"] == "qwen3-0.6b"
    assert payload["callback_url"] == "https://api.example/v1/jobs/j1/complete"
    assert payload["callback_secret"] == "cb-secret"
    assert jobs.refs == {"j1": "call-1"}


async def test_a_finished_job_is_not_spawned_again():
    spawner = RecordingSpawner()
    await spawn_work_order(ORDER, envelope=envelope(), spawner=spawner, jobs=FakeJobs("ready"),
                           public_base_url="https://api.example", callback_secret="x")
    assert spawner.payloads == []


async def test_a_refused_spawn_raises_so_the_order_is_retried_not_acked():
    jobs = FakeJobs()
    with pytest.raises(SpawnRefused):
        await spawn_work_order(ORDER, envelope=envelope(), spawner=RecordingSpawner(SpawnRefused("503")), jobs=jobs,
                               public_base_url="https://api.example", callback_secret="x")
    assert jobs.refs == {}


async def test_http_spawner_posts_the_payload_and_reads_the_call_id(monkeypatch: pytest.MonkeyPatch):
    seen: list[dict[str, Any]] = []

    def serve(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"call_id": "fc-1"}) if len(seen) == 1 else httpx.Response(503)

    real = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real(transport=httpx.MockTransport(serve), **kw))
    spawner = HttpSpawner("http://fake/spawn")
    assert await spawner.spawn({"job_id": "j1"}) == "fc-1"
    with pytest.raises(SpawnRefused, match="503"):
        await spawner.spawn({"job_id": "j2"})
    assert [p["job_id"] for p in seen] == ["j1", "j2"]
    assert modal_executor.payload_for(ORDER, callback_url="u", callback_secret="s")["callback_url"] == "u"
