"""Bounds on what piles up: pending jobs per account, full work queues, deadlines by text length, superseded
attempts, retention of finished jobs, and what a job's error text may hold."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from timbre_common.catalogue import expected_synthesis_seconds
from timbre_common.contracts.storage import ObjectsReleased
from timbre_common.contracts.synthesis import (
    FetchJobAudio,
    JobFailed,
    LookupJob,
    SynthesisFailed,
    SynthesisRequested,
)
from timbre_common.messaging import PublishRefused, RpcError
from timbre_common.testing import envelope, load_module
from timbre_dispatcher import handlers
from timbre_dispatcher.adapters.modal_executor import spawn_work_order

unit = load_module("timbre_dispatcher_unit_handlers", Path(__file__).with_name("test_handlers.py"))
ACCOUNT, OTHER, BACKEND = unit.ACCOUNT, unit.OTHER, unit.BACKEND


class FullQueueBus(unit.FakeBus):
    """The broker refuses work orders, as a queue at its x-max-length with reject-publish does."""

    async def publish(self, event: Any, **kwargs: Any) -> str:
        if isinstance(event, SynthesisRequested):
            raise PublishRefused("queue full")
        return await super().publish(event, **kwargs)


def world(**policy: Any) -> Any:
    w = unit.World()
    w.policy = handlers.JobPolicy(**{"deadline_s": 300.0, "max_attempts": 3, "reference_url_ttl_s": 600, **policy})
    return w


async def test_an_account_at_its_pending_cap_is_refused_with_429_and_nothing_is_created() -> None:
    w = world(max_pending_per_account=2)
    await w.submit("One.")
    await w.submit("Two.")
    with pytest.raises(RpcError) as refused:
        await w.submit("Three.")
    assert (refused.value.status, refused.value.code) == (429, "too_many_pending_jobs")
    assert len(w.jobs.rows) == 2 and len(w.orders()) == 2
    # Another account is not held back, and a finished job frees a place.
    await w.submit("Three.", account=OTHER)
    first = next(iter(w.jobs.rows))
    await w.stored(first)
    await w.submit("Three.")
    assert len([r for r in w.jobs.rows.values() if r["account_id"] == ACCOUNT]) == 3


async def test_a_refused_work_order_fails_its_job_and_tells_the_client_503() -> None:
    w = world()
    w.bus = FullQueueBus()
    w.storage = unit.fakes.FakeStorage(w.bus, w.clock)
    w.storage.put(unit.custom_voice().reference_key, b"RIFF-reference")
    with pytest.raises(RpcError) as refused:
        await w.submit("Hello.")
    assert (refused.value.status, refused.value.code) == (503, "work_queue_full")
    assert refused.value.details["retry_after_s"] > 0
    [row] = w.jobs.rows.values()
    # Not pending forever: failed at once, and job.failed gives the quota hold back.
    assert (row["status"], row["error_code"]) == ("failed", "work_queue_full")
    assert [e.job_id for e in w.bus.events(JobFailed)] == [str(row["job_id"])]


def test_a_jobs_deadline_grows_with_its_text_above_a_floor() -> None:
    policy = handlers.JobPolicy(deadline_s=300.0, deadline_per_char_s={"qwen3-0.6b": 0.2})
    assert policy.deadline_for("qwen3-0.6b", 10) == 300.0
    # Never below the time the worker and a Modal call are given for the same text, plus delivery.
    assert policy.deadline_for("qwen3-0.6b", 5000) == pytest.approx(
        max(1000.0, expected_synthesis_seconds("qwen3-0.6b", 5000) + handlers.DELIVERY_SLACK_S))
    assert policy.deadline_for("qwen3-0.6b", 5000) > expected_synthesis_seconds("qwen3-0.6b", 5000)
    assert policy.deadline_for("embedded", 5000) == 300.0  # no rate: the floor


async def test_a_long_job_is_not_sent_again_while_its_first_attempt_may_still_run() -> None:
    w = world(deadline_per_char_s={BACKEND: 0.2})
    short = await w.submit("Short.")
    long = await w.submit("word " * 1000)  # 5,000 characters: 1,000 s at 0.2 s a character
    w.clock.advance(301)
    await handlers.sweep_overdue(jobs=w.jobs, bus=w.bus, policy=w.policy)
    attempts = {o.job_id: o.attempt for o in w.orders() if o.attempt > 1}
    assert attempts == {short.job_id: 2}
    assert w.jobs.rows[long.job_id]["attempts"] == 1
    w.clock.advance(w.policy.deadline_for(BACKEND, 5000) - 301 + 1)
    await handlers.sweep_overdue(jobs=w.jobs, bus=w.bus, policy=w.policy)
    assert w.jobs.rows[long.job_id]["attempts"] == 2


async def test_the_worker_learns_the_jobs_current_attempt_from_lookup() -> None:
    w = world()
    accepted = await w.submit("Hello.")
    w.clock.advance(301)
    await handlers.sweep_overdue(jobs=w.jobs, bus=w.bus, policy=w.policy)
    owner = await handlers.lookup_job(LookupJob(job_id=accepted.job_id), envelope=envelope(), jobs=w.jobs)
    assert (owner.status, owner.attempts) == ("pending", 2)


async def test_the_modal_executor_skips_a_superseded_attempt() -> None:
    w = world()
    accepted = await w.submit("Hello.")
    [first] = w.orders()
    w.clock.advance(301)
    await handlers.sweep_overdue(jobs=w.jobs, bus=w.bus, policy=w.policy)

    class Spawner:
        payloads: list[dict[str, Any]] = []

        async def spawn(self, payload: dict[str, Any]) -> str:
            self.payloads.append(payload)
            return "call"

    spawner = Spawner()
    await spawn_work_order(first, envelope=envelope(), spawner=spawner, jobs=w.jobs, public_base_url="https://x",
                           callback_secret="s")
    assert spawner.payloads == [] and w.jobs.rows[accepted.job_id]["executor_ref"] is None


async def test_a_presigned_url_never_reaches_a_jobs_error_text() -> None:
    w = world()
    accepted = await w.submit("Hello.")
    leaked = ("could not fetch the reference audio: Client error '403 Forbidden' for url "
              "'https://acct.r2.cloudflarestorage.com/b/voices/custom/a/v.wav?X-Amz-Algorithm=AWS4-HMAC-SHA256"
              "&X-Amz-Credential=AKIAEXAMPLE%2F20260301&X-Amz-Signature=deadbeef'")
    await handlers.on_synthesis_failed(
        SynthesisFailed(job_id=accepted.job_id, account_id=ACCOUNT, code="reference_unavailable", reason=leaked),
        envelope=envelope(), jobs=w.jobs, bus=w.bus, policy=w.policy)
    row = w.jobs.rows[accepted.job_id]
    assert row["status"] == "failed"
    assert "X-Amz" not in row["error"] and "deadbeef" not in row["error"] and "AKIA" not in row["error"]
    assert "https://acct.r2.cloudflarestorage.com/b/voices/custom/a/v.wav" in row["error"]
    assert all("deadbeef" not in e.reason for e in w.bus.events(JobFailed))


async def test_finished_jobs_and_their_text_are_deleted_after_the_retention() -> None:
    w = world()
    done = await w.submit("Finished long ago.")
    await w.stored(done.job_id)
    pending = await w.submit("Still running.")
    w.clock.advance(10 * 24 * 3600)
    recent = await w.submit("Finished recently.")
    await w.stored(recent.job_id)
    deleted = await handlers.sweep_finished(jobs=w.jobs, cache=w.cache, bus=w.bus, retention_s=7 * 24 * 3600)
    assert deleted == 1
    assert set(w.jobs.rows) == {pending.job_id, recent.job_id}
    assert all(str(e["job_id"]) != done.job_id for e in w.cache.entries.values())
    released = [k for e in w.bus.events(ObjectsReleased) for k in e.keys]
    assert released == [f"generations/{ACCOUNT}/{done.job_id}.wav"]


async def test_a_download_in_another_format_is_storages_rendition_not_a_wav() -> None:
    w = world()
    accepted = await w.submit("Hello.")
    await w.stored(accepted.job_id)
    w.storage.put(f"generations/{ACCOUNT}/{accepted.job_id}.wav", unit_wav(), w.clock() + timedelta(days=7))
    view, body = await handlers.fetch_audio(FetchJobAudio(account_id=ACCOUNT, job_id=accepted.job_id,
                                                          response_format="flac"),
                                            envelope=envelope(), jobs=w.jobs, cache=w.cache, bus=w.bus)
    assert view.content_type == "audio/flac" and body[:4] == b"fLaC" and view.response_format == "flac"
    assert w.storage.encoded == [(f"generations/{ACCOUNT}/{accepted.job_id}.wav", "flac")]


def unit_wav() -> bytes:
    import numpy as np

    from timbre_common.audio import encode_wav

    return encode_wav(np.zeros(2400, dtype=np.float32), 24000)
