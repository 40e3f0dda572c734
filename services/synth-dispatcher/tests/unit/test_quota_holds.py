"""Billing's quota hold on a job: kept by a new job, carried to job.ready / job.failed, refused by hits and joins."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from timbre_common.contracts.storage import AudioStored
from timbre_common.contracts.synthesis import JobFailed, JobReady, SubmitSynthesis, SynthesisFailed, VoiceSnapshot
from timbre_common.testing import FakeBus, envelope, load_module
from timbre_dispatcher import domain, handlers

fakes = load_module("timbre_dispatcher_unit_fakes", Path(__file__).with_name("fakes.py"))
ACCOUNT = "acc-holds"
VOICE = "sys-joe"
BACKEND = "embedded"


class World:
    def __init__(self) -> None:
        self.clock = fakes.Clock()
        self.bus = FakeBus()
        self.jobs = fakes.FakeJobRepository(self.clock)
        self.cache = fakes.FakeCacheIndex(self.clock)
        self.storage = fakes.FakeStorage(self.bus, self.clock)
        self.policy = handlers.JobPolicy(deadline_s=300.0, max_attempts=1, reference_url_ttl_s=600)

    async def submit(self, text: str, hold_id: str | None, *, voice: VoiceSnapshot | None = None) -> Any:
        voice = voice or VoiceSnapshot(voice_id=VOICE, backend=BACKEND, lang="en", kind="system",
                                       system_voice="joe")
        cmd = SubmitSynthesis(account_id=ACCOUNT, voice=voice, text=text, lang="en", backend=BACKEND,
                              hold_id=hold_id)
        return await handlers.submit(cmd, envelope=envelope(), jobs=self.jobs, cache=self.cache, bus=self.bus,
                                     policy=self.policy)


@pytest.fixture
def world() -> World:
    return World()


async def test_a_new_job_keeps_the_hold_and_job_ready_carries_it(world: World) -> None:
    accepted = await world.submit("Held words.", "hold-1")
    assert accepted.hold_attached and world.jobs.rows[accepted.job_id]["hold_id"] == "hold-1"
    key = f"generations/{ACCOUNT}/{accepted.job_id}.wav"
    stored = AudioStored(job_id=accepted.job_id, account_id=ACCOUNT, key=key, size=44,
                         expires_at=world.clock() + timedelta(days=7), synthesis_ms=5, audio_seconds=1.0)
    world.storage.put(key, b"RIFF", stored.expires_at)
    await handlers.on_audio_stored(stored, envelope=envelope(), jobs=world.jobs, cache=world.cache, bus=world.bus)
    await handlers.on_audio_stored(stored, envelope=envelope(), jobs=world.jobs, cache=world.cache, bus=world.bus)
    # Announced again on redelivery, with the same hold: billing drops it once and counts the job once.
    assert [(e.job_id, e.hold_id) for e in world.bus.events(JobReady)] == [(accepted.job_id, "hold-1")] * 2


async def test_a_failed_job_carries_its_hold_in_job_failed(world: World) -> None:
    accepted = await world.submit("Doomed words.", "hold-2")
    failure = SynthesisFailed(job_id=accepted.job_id, account_id=ACCOUNT, code="worker_crashed", reason="boom")
    await handlers.on_synthesis_failed(failure, envelope=envelope(), jobs=world.jobs, bus=world.bus,
                                       policy=world.policy)
    assert [(e.code, e.hold_id) for e in world.bus.events(JobFailed)] == [("worker_crashed", "hold-2")]


async def test_a_joined_job_or_a_cache_hit_does_not_take_the_hold(world: World) -> None:
    first = await world.submit("Same words.", "hold-a")
    joined = await world.submit("Same words.", "hold-b")
    assert joined.job_id == first.job_id and not joined.hold_attached
    assert world.jobs.rows[first.job_id]["hold_id"] == "hold-a"
    key = domain.cache_key(VOICE, "Cached words.", "en", BACKEND)
    expires = world.clock() + timedelta(days=7)
    await world.cache.put(account_id=ACCOUNT, cache_key=key, voice_id=VOICE, job_id="job-old",
                          audio_key="generations/old.wav", expires_at=expires, synthesis_ms=1)
    world.storage.put("generations/old.wav", b"RIFF", expires)
    hit, _ = await world.submit("Cached words.", "hold-c")
    assert hit.cache_hit and not hit.hold_attached


async def test_without_a_hold_nothing_is_attached(world: World) -> None:
    accepted = await world.submit("Billing off.", None)
    assert not accepted.hold_attached and world.jobs.rows[accepted.job_id]["hold_id"] is None
