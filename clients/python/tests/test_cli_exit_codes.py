"""Exit codes of the CLI that the platform rarely produces on demand (a failed job, a wait that runs out, the
quota), against a scripted transport."""
from __future__ import annotations

import functools
import json

import httpx
import pytest
from click.testing import CliRunner

from timbre import Timbre, cli
from timbre._base import RetryPolicy

JOB = {"job_id": "00000000-0000-4000-8000-000000000001", "voice_id": "v", "backend": "embedded", "lang": "en",
       "characters": 5, "response_format": "wav", "created_at": "2026-11-29T21:00:00Z"}


def _run(monkeypatch: pytest.MonkeyPatch, answers: list[httpx.Response], *args: str) -> tuple[int, dict]:
    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    class Scripted(Timbre):
        def __init__(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*a, transport=httpx.MockTransport(handler), **kw)
            self.retry = RetryPolicy(max_retries=1, backoff_s=0.001)

    monkeypatch.setattr(cli, "Timbre", functools.partial(Scripted))
    result = CliRunner().invoke(cli.main, [*args, "--json"], env={"TIMBRE_API_KEY": "tb_scripted_0123456789",
                                                                  "TIMBRE_BASE_URL": "http://timbre.test"})
    return result.exit_code, json.loads(result.stdout)


def test_a_failed_job_exits_5(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = {**JOB, "status": "failed", "error_code": "synthesis_failed", "error": "the backend crashed"}
    code, out = _run(monkeypatch, [httpx.Response(200, json=failed)], "jobs", "wait", JOB["job_id"])
    assert code == 5 and out["error"]["code"] == "synthesis_failed" and out["error"]["job_id"] == JOB["job_id"]


def test_a_wait_that_runs_out_exits_6(monkeypatch: pytest.MonkeyPatch) -> None:
    pending = {**JOB, "status": "pending"}
    code, out = _run(monkeypatch, [httpx.Response(200, json=pending)] * 5, "jobs", "wait", JOB["job_id"],
                     "--timeout", "0.1")
    assert code == 6 and out["error"]["code"] == "wait_timeout"


def test_quota_and_rate_limits_exit_8(monkeypatch: pytest.MonkeyPatch) -> None:
    quota = httpx.Response(402, json={"error": {"code": "quota_exceeded", "message": "used up"}})
    code, out = _run(monkeypatch, [quota], "usage")
    assert code == 8 and out["error"] == {"code": "quota_exceeded", "message": "used up", "status": 402}
