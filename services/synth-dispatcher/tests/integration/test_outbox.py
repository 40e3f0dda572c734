"""The dispatcher's job.failed and job.ready commit with the job's transition (the outbox), against PostgreSQL:
a crash right after the commit still announces them, exactly under the ids consumers dedupe on."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from timbre_common.contracts import Envelope, utcnow
from timbre_common.contracts.storage import AudioStored
from timbre_common.contracts.synthesis import JobFailed, JobReady, SynthesisFailed
from timbre_common.db import create_pool, migrate
from timbre_common.messaging import OutboxBus, TransactionalPool
from timbre_dispatcher import handlers
from timbre_dispatcher.adapters.repository import CacheIndex, JobRepository

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


class Broker:
    def __init__(self) -> None:
        self.events: list[tuple[object, str | None]] = []

    async def publish(self, event, *, message_id=None, **_):  # type: ignore[no-untyped-def]
        self.events.append((event, message_id))
        return message_id


@pytest.fixture
async def pool(database_url: str, pg_schema: str) -> AsyncIterator[TransactionalPool]:
    raw = await create_pool(database_url, schema=pg_schema)
    await migrate(raw, pg_schema, MIGRATIONS)
    pool = TransactionalPool(raw)
    yield pool
    await raw.close()


async def _job(jobs: JobRepository) -> str:
    job_id = str(uuid.uuid4())
    await jobs.create(job_id=job_id, account_id="acc", voice_id="v", text="hello", lang="en", backend="embedded",
                      cache_key=f"k-{job_id}", response_format="wav", request={}, deadline_s=60, hold_id="h1")
    return job_id


def _envelope() -> Envelope:
    return Envelope(message_id=str(uuid.uuid4()), type="x", version=1, occurred_at=utcnow())


async def test_job_failed_survives_a_crash_after_the_commit(pool: TransactionalPool):
    jobs, broker = JobRepository(pool), Broker()
    outbox = OutboxBus(broker, pool)
    await outbox.ensure()
    job_id = await _job(jobs)
    await handlers.on_synthesis_failed(
        SynthesisFailed(job_id=job_id, account_id="acc", code="bad_text", reason="nothing to say", retryable=False),
        envelope=_envelope(), jobs=jobs, bus=outbox, policy=handlers.JobPolicy())
    # Crash now: the job is failed and its announcement is waiting in the outbox, not lost.
    assert (await jobs.get(job_id))["status"] == "failed"
    assert broker.events == [] and await outbox.pending() == 1
    assert await OutboxBus(broker, pool).relay_once() == 1
    [(event, message_id)] = broker.events
    assert isinstance(event, JobFailed) and event.job_id == job_id and event.hold_id == "h1"
    assert message_id == f"job.failed:{job_id}"


async def test_job_ready_and_its_cache_entry_commit_with_the_announcement(pool: TransactionalPool):
    jobs, cache, broker = JobRepository(pool), CacheIndex(pool), Broker()
    outbox = OutboxBus(broker, pool)
    await outbox.ensure()
    job_id = await _job(jobs)
    stored = AudioStored(job_id=job_id, account_id="acc", key=f"generations/acc/{job_id}.wav", size=10,
                         expires_at=None, synthesis_ms=5, audio_seconds=1.0)
    await handlers.on_audio_stored(stored, envelope=_envelope(), jobs=jobs, cache=cache, bus=outbox)
    assert (await jobs.get(job_id))["status"] == "ready" and await outbox.pending() == 1
    await outbox.relay_once()
    [(event, message_id)] = broker.events
    assert isinstance(event, JobReady) and message_id == f"job.ready:{job_id}"
