"""JobRepository and CacheIndex against PostgreSQL (fresh schema per test)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from timbre_common.db import create_pool, migrate
from timbre_dispatcher.adapters.repository import CacheIndex, JobRepository
from timbre_dispatcher.domain import FAILED, PENDING, READY

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


@pytest.fixture
async def pool(database_url: str, pg_schema: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, schema=pg_schema)
    await migrate(pool, pg_schema, MIGRATIONS)
    yield pool
    await pool.close()


@pytest.fixture
def jobs(pool: asyncpg.Pool) -> JobRepository:
    return JobRepository(pool)


@pytest.fixture
def cache(pool: asyncpg.Pool) -> CacheIndex:
    return CacheIndex(pool)


async def new_job(jobs: JobRepository, *, account: str = "acc1", voice: str = "v1", key: str = "k1",
                  fmt: str = "wav", deadline_s: float = 60.0, text: str = "hello there",
                  hold_id: str | None = None) -> str:
    job_id = str(uuid.uuid4())
    await jobs.create(job_id=job_id, account_id=account, voice_id=voice, text=text, lang="en", backend="piper",
                      cache_key=key, response_format=fmt, request={"text": text, "opts": [1, 2]},
                      deadline_s=deadline_s, hold_id=hold_id)
    return job_id


async def ready(jobs: JobRepository, job_id: str, audio_key: str) -> asyncpg.Record | None:
    return await jobs.mark_ready(job_id, audio_key=audio_key, expires_at=None, synthesis_ms=12, audio_seconds=1.5)


def ids(rows: list[asyncpg.Record]) -> set[str]:
    return {str(r["job_id"]) for r in rows}


# --- JobRepository -------------------------------------------------------------------------------------------


async def test_create_returns_the_pending_row(jobs: JobRepository) -> None:
    job_id = str(uuid.uuid4())
    row = await jobs.create(job_id=job_id, account_id="acc1", voice_id="v1", text="héllo", lang="en",
                            backend="piper", cache_key="k1", response_format="mp3",
                            request={"text": "héllo", "speed": 1.0}, deadline_s=60)
    assert str(row["job_id"]) == job_id
    assert row["status"] == PENDING and row["attempts"] == 1 and row["characters"] == 5
    assert row["request"] == {"text": "héllo", "speed": 1.0}
    assert row["response_format"] == "mp3" and row["hold_id"] is None
    assert row["completed_at"] is None and row["audio_key"] is None
    # The deadline is deadline_s after creation, on the database clock.
    assert abs((row["deadline_at"] - row["created_at"]).total_seconds() - 60) < 5


async def test_get_with_and_without_account(jobs: JobRepository) -> None:
    job_id = await new_job(jobs, account="acc1")
    assert str((await jobs.get(job_id))["job_id"]) == job_id
    assert str((await jobs.get(job_id, "acc1"))["job_id"]) == job_id
    assert await jobs.get(job_id, "acc2") is None
    assert await jobs.get(str(uuid.uuid4())) is None


async def test_hold_id_round_trips(jobs: JobRepository) -> None:
    held = await new_job(jobs, hold_id="hold_123")
    unheld = await new_job(jobs)
    assert (await jobs.get(held))["hold_id"] == "hold_123"
    assert (await jobs.get(unheld))["hold_id"] is None


async def test_pending_for_matches_account_key_and_format(jobs: JobRepository) -> None:
    first = await new_job(jobs, account="acc1", key="k1", fmt="wav")
    await new_job(jobs, account="acc1", key="k1", fmt="mp3")
    await new_job(jobs, account="acc2", key="k1", fmt="wav")
    await new_job(jobs, account="acc1", key="k2", fmt="wav")
    found = await jobs.pending_for("acc1", "k1", "wav")
    assert found is not None and str(found["job_id"]) == first
    assert await jobs.pending_for("acc1", "k1", "ogg") is None
    assert await jobs.pending_for("acc3", "k1", "wav") is None


async def test_pending_for_ignores_finished_jobs(jobs: JobRepository) -> None:
    done = await new_job(jobs, key="k1")
    failed = await new_job(jobs, key="k2")
    assert await ready(jobs, done, "a/done.wav") is not None
    assert await jobs.mark_failed(failed, code="backend_error", reason="boom") is not None
    assert await jobs.pending_for("acc1", "k1", "wav") is None
    assert await jobs.pending_for("acc1", "k2", "wav") is None
    # A newer pending job with the same key is the one found.
    again = await new_job(jobs, key="k1")
    assert str((await jobs.pending_for("acc1", "k1", "wav"))["job_id"]) == again


async def test_mark_ready_first_terminal_transition_wins(jobs: JobRepository) -> None:
    job_id = await new_job(jobs)
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    row = await jobs.mark_ready(job_id, audio_key="a/1.wav", expires_at=expires, synthesis_ms=40, audio_seconds=2.5)
    assert row is not None
    assert row["status"] == READY and row["audio_key"] == "a/1.wav" and row["audio_expires_at"] == expires
    assert row["synthesis_ms"] == 40 and row["audio_seconds"] == 2.5 and row["completed_at"] is not None

    # A duplicate completion (redelivery, a second worker) changes nothing.
    assert await jobs.mark_ready(job_id, audio_key="a/2.wav", expires_at=None, synthesis_ms=1,
                                 audio_seconds=9.0) is None
    # A late failure (deadline sweep, worker error) after ready changes nothing either.
    assert await jobs.mark_failed(job_id, code="deadline_exceeded", reason="late") is None
    after = await jobs.get(job_id)
    assert after["status"] == READY and after["audio_key"] == "a/1.wav" and after["synthesis_ms"] == 40
    assert after["error_code"] is None and after["completed_at"] == row["completed_at"]


async def test_mark_ready_after_failed_changes_nothing(jobs: JobRepository) -> None:
    job_id = await new_job(jobs)
    failed = await jobs.mark_failed(job_id, code="backend_error", reason="boom")
    assert failed["status"] == FAILED and failed["error_code"] == "backend_error" and failed["error"] == "boom"
    assert failed["completed_at"] is not None
    assert await ready(jobs, job_id, "a/late.wav") is None
    # A second failure from pending-only is refused too: the first reason stays.
    assert await jobs.mark_failed(job_id, code="other", reason="again") is None
    after = await jobs.get(job_id)
    assert after["status"] == FAILED and after["audio_key"] is None and after["error_code"] == "backend_error"


async def test_mark_failed_from_ready_only_when_allowed(jobs: JobRepository) -> None:
    job_id = await new_job(jobs)
    done = await ready(jobs, job_id, "a/1.wav")
    assert await jobs.mark_failed(job_id, code="audio_lost", reason="x", from_status=(PENDING,)) is None
    row = await jobs.mark_failed(job_id, code="audio_lost", reason="blob gone", from_status=(PENDING, READY))
    assert row is not None and row["status"] == FAILED and row["error_code"] == "audio_lost"
    # completed_at keeps the first terminal time.
    assert row["completed_at"] == done["completed_at"]


async def test_mark_unknown_job_returns_none(jobs: JobRepository) -> None:
    missing = str(uuid.uuid4())
    assert await ready(jobs, missing, "a/x.wav") is None
    assert await jobs.mark_failed(missing, code="c", reason="r") is None
    assert await jobs.retry(missing, deadline_s=10) is None


async def test_retry_counts_an_attempt_and_pushes_the_deadline(jobs: JobRepository) -> None:
    job_id = await new_job(jobs, deadline_s=5)
    before = await jobs.get(job_id)
    row = await jobs.retry(job_id, deadline_s=600)
    assert row["attempts"] == 2 and row["status"] == PENDING
    assert row["deadline_at"] - before["deadline_at"] > timedelta(seconds=500)
    assert (await jobs.retry(job_id, deadline_s=600))["attempts"] == 3
    # A finished job is not retried.
    await ready(jobs, job_id, "a/1.wav")
    assert await jobs.retry(job_id, deadline_s=600) is None
    assert (await jobs.get(job_id))["attempts"] == 3


async def test_retry_revives_an_overdue_job_out_of_the_sweep(jobs: JobRepository) -> None:
    job_id = await new_job(jobs, deadline_s=-60)
    await jobs.retry(job_id, deadline_s=600)
    assert await jobs.overdue() == []


async def test_overdue_claims_only_pending_jobs_past_deadline(jobs: JobRepository) -> None:
    late = await new_job(jobs, deadline_s=-60)
    await new_job(jobs, deadline_s=600)  # pending, not due
    late_ready = await new_job(jobs, deadline_s=-60)
    await ready(jobs, late_ready, "a/r.wav")
    late_failed = await new_job(jobs, deadline_s=-60)
    await jobs.mark_failed(late_failed, code="c", reason="r")

    claimed = await jobs.overdue()
    assert ids(claimed) == {late}
    # Claiming pushes the deadline so the next sweep (or a replica) does not act on it again at once.
    assert claimed[0]["deadline_at"] > datetime.now(UTC) + timedelta(seconds=10)
    assert claimed[0]["status"] == PENDING
    assert await jobs.overdue() == []


async def test_overdue_respects_limit_and_deadline_order(jobs: JobRepository) -> None:
    oldest = await new_job(jobs, deadline_s=-300)
    middle = await new_job(jobs, deadline_s=-200)
    newest = await new_job(jobs, deadline_s=-100)
    assert ids(await jobs.overdue(limit=2)) == {oldest, middle}
    assert ids(await jobs.overdue(limit=2)) == {newest}


async def test_concurrent_overdue_sweeps_never_share_a_job(jobs: JobRepository, database_url: str,
                                                          pg_schema: str) -> None:
    # A second pool stands for a second dispatcher replica.
    other_pool = await create_pool(database_url, schema=pg_schema)
    try:
        replicas = [jobs, JobRepository(other_pool)]
        for _round in range(5):
            due = {await new_job(jobs, deadline_s=-60 - i) for i in range(30)}
            claims = await asyncio.gather(*(repo.overdue(limit=20) for repo in replicas for _ in range(2)))
            claimed = [str(r["job_id"]) for rows in claims for r in rows]
            assert len(claimed) == len(set(claimed)), "a job was claimed by two sweeps"
            assert set(claimed) == due
            assert await jobs.overdue() == []
            for job_id in due:
                await jobs.mark_failed(job_id, code="deadline_exceeded", reason="swept")
    finally:
        await other_pool.close()


async def test_set_executor_ref(jobs: JobRepository) -> None:
    job_id = await new_job(jobs)
    assert (await jobs.get(job_id))["executor_ref"] is None
    await jobs.set_executor_ref(job_id, "modal-call-1")
    assert (await jobs.get(job_id))["executor_ref"] == "modal-call-1"
    await jobs.set_executor_ref(job_id, "modal-call-2")
    assert (await jobs.get(job_id))["executor_ref"] == "modal-call-2"


async def test_fail_with_audio_fails_only_ready_jobs_with_those_keys(jobs: JobRepository) -> None:
    lost_a = await new_job(jobs)
    lost_b = await new_job(jobs, account="acc2")
    kept = await new_job(jobs)
    pending = await new_job(jobs)
    await ready(jobs, lost_a, "a/lost.wav")
    await ready(jobs, lost_b, "a/lost2.wav")
    await ready(jobs, kept, "a/kept.wav")

    rows = await jobs.fail_with_audio(["a/lost.wav", "a/lost2.wav", "a/none.wav"], code="audio_expired",
                                      reason="audio is gone")
    assert ids(rows) == {lost_a, lost_b}
    assert all(r["status"] == FAILED and r["error_code"] == "audio_expired" for r in rows)
    assert (await jobs.get(kept))["status"] == READY
    assert (await jobs.get(pending))["status"] == PENDING
    # Already failed: a second pass finds nothing.
    assert await jobs.fail_with_audio(["a/lost.wav"], code="audio_expired", reason="again") == []
    assert await jobs.fail_with_audio([], code="audio_expired", reason="none") == []


async def test_delete_voice_returns_job_ids_and_audio_keys(jobs: JobRepository) -> None:
    done = await new_job(jobs, voice="v1")
    pending = await new_job(jobs, voice="v1")
    other_voice = await new_job(jobs, voice="v2")
    other_account = await new_job(jobs, account="acc2", voice="v1")
    await ready(jobs, done, "a/v1.wav")

    rows = await jobs.delete_voice("acc1", "v1")
    assert {str(r["job_id"]): r["audio_key"] for r in rows} == {done: "a/v1.wav", pending: None}
    assert await jobs.get(done) is None and await jobs.get(pending) is None
    assert await jobs.get(other_voice) is not None and await jobs.get(other_account) is not None
    assert await jobs.delete_voice("acc1", "v1") == []


async def test_delete_account_returns_job_ids_and_audio_keys(jobs: JobRepository) -> None:
    a = await new_job(jobs, voice="v1")
    b = await new_job(jobs, voice="v2")
    other = await new_job(jobs, account="acc2")
    await ready(jobs, a, "a/1.wav")

    rows = await jobs.delete_account("acc1")
    assert {str(r["job_id"]): r["audio_key"] for r in rows} == {a: "a/1.wav", b: None}
    assert await jobs.get(a) is None and await jobs.get(b) is None
    assert await jobs.get(other) is not None
    assert await jobs.delete_account("acc1") == []


# --- CacheIndex ----------------------------------------------------------------------------------------------


async def put(cache: CacheIndex, *, account: str = "acc1", key: str = "k1", voice: str = "v1",
              audio: str = "a/1.wav", expires_at: datetime | None = None, job_id: str | None = None,
              ms: int | None = 10) -> str:
    job_id = job_id or str(uuid.uuid4())
    await cache.put(account_id=account, cache_key=key, voice_id=voice, job_id=job_id, audio_key=audio,
                    expires_at=expires_at, synthesis_ms=ms)
    return job_id


def future(days: float = 1) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


async def test_cache_put_get_scoped_by_account(cache: CacheIndex) -> None:
    expires = future()
    job_id = await put(cache, expires_at=expires, ms=33)
    row = await cache.get("acc1", "k1")
    assert row is not None
    assert str(row["job_id"]) == job_id and row["audio_key"] == "a/1.wav" and row["voice_id"] == "v1"
    assert row["synthesis_ms"] == 33 and abs((row["expires_at"] - expires).total_seconds()) < 0.001
    # Another account asking for the same key learns nothing.
    assert await cache.get("acc2", "k1") is None
    assert await cache.get("acc1", "k2") is None


async def test_cache_put_upserts(cache: CacheIndex) -> None:
    await put(cache, audio="a/old.wav", expires_at=future(), ms=5)
    newer = await put(cache, audio="a/new.wav", expires_at=None, ms=7)
    row = await cache.get("acc1", "k1")
    assert str(row["job_id"]) == newer and row["audio_key"] == "a/new.wav"
    assert row["expires_at"] is None and row["synthesis_ms"] == 7
    count = await cache.pool.fetchval("SELECT count(*) FROM cache_entries")
    assert count == 1


async def test_cache_get_ignores_expired_entries(cache: CacheIndex) -> None:
    await put(cache, key="old", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    await put(cache, key="forever", expires_at=None)
    await put(cache, key="fresh", expires_at=future())
    assert await cache.get("acc1", "old") is None
    assert await cache.get("acc1", "forever") is not None
    assert await cache.get("acc1", "fresh") is not None
    # Re-putting an expired key revives it.
    await put(cache, key="old", expires_at=future())
    assert await cache.get("acc1", "old") is not None


async def test_cache_drop_and_drop_audio(cache: CacheIndex) -> None:
    await put(cache, key="k1", audio="a/shared.wav")
    await put(cache, key="k2", audio="a/shared.wav", account="acc2")
    await put(cache, key="k3", audio="a/other.wav")
    await put(cache, key="k4", audio="a/kept.wav")
    assert await cache.drop_audio(["a/shared.wav", "a/other.wav", "a/missing.wav"]) == 3
    assert await cache.get("acc1", "k1") is None and await cache.get("acc2", "k2") is None
    assert await cache.get("acc1", "k3") is None and await cache.get("acc1", "k4") is not None
    assert await cache.drop_audio(["a/shared.wav"]) == 0
    await cache.drop("acc1", "k4")
    assert await cache.get("acc1", "k4") is None


async def test_cache_delete_voice_returns_audio_keys(cache: CacheIndex) -> None:
    await put(cache, key="k1", voice="v1", audio="a/1.wav")
    await put(cache, key="k2", voice="v1", audio="a/2.wav", expires_at=datetime(2000, 1, 1, tzinfo=UTC))
    await put(cache, key="k3", voice="v2", audio="a/3.wav")
    await put(cache, key="k4", voice="v1", audio="a/4.wav", account="acc2")
    # Expired entries are deleted (and their audio reported) too: nothing of the voice may remain.
    assert sorted(await cache.delete_voice("acc1", "v1")) == ["a/1.wav", "a/2.wav"]
    assert await cache.get("acc1", "k3") is not None and await cache.get("acc2", "k4") is not None
    assert await cache.delete_voice("acc1", "v1") == []


async def test_cache_delete_account(cache: CacheIndex) -> None:
    await put(cache, key="k1")
    await put(cache, key="k2", voice="v2")
    await put(cache, key="k1", account="acc2")
    assert await cache.delete_account("acc1") == 2
    assert await cache.get("acc1", "k1") is None and await cache.get("acc1", "k2") is None
    assert await cache.get("acc2", "k1") is not None
    assert await cache.delete_account("acc1") == 0



async def test_a_burst_of_submissions_cannot_pass_the_pending_cap(jobs: JobRepository) -> None:
    async def submit(n: int) -> asyncpg.Record | None:
        return await jobs.create(job_id=str(uuid.uuid4()), account_id="burst", voice_id="v", text=f"t{n}",
                                 lang="en", backend="piper", cache_key=f"k{n}", response_format="wav", request={},
                                 deadline_s=60, max_pending=5)

    made = await asyncio.gather(*(submit(n) for n in range(20)))
    assert sum(r is not None for r in made) == 5
    assert await jobs.pool.fetchval("SELECT count(*) FROM jobs WHERE account_id = 'burst'") == 5


async def test_finished_jobs_are_deleted_after_the_retention_and_pending_ones_never(jobs: JobRepository,
                                                                                  cache: CacheIndex) -> None:
    old, recent, running = [await new_job(jobs, key=k) for k in ("a", "b", "c")]
    await ready(jobs, old, "generations/acc1/old.wav")
    await jobs.mark_failed(recent, code="x", reason="y")
    await jobs.pool.execute("UPDATE jobs SET completed_at = now() - interval '40 days', "
                            "created_at = now() - interval '40 days' WHERE job_id = $1 OR job_id = $2", old, running)
    gone = await jobs.delete_finished(older_than_s=30 * 24 * 3600)
    assert [(str(r["job_id"]), r["audio_key"]) for r in gone] == [(old, "generations/acc1/old.wav")]
    assert await jobs.get(old) is None and await jobs.get(recent) is not None
    assert (await jobs.get(running))["status"] == PENDING
