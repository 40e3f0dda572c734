"""Jobs and the synthesis cache index in PostgreSQL (schema `dispatch`)."""
from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from ..domain import PENDING


class JobRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(self, *, job_id: str, account_id: str, voice_id: str, text: str, lang: str, backend: str,
                     cache_key: str, response_format: str, request: dict[str, Any],
                     deadline_s: float, hold_id: str | None = None,
                     max_pending: int | None = None) -> asyncpg.Record | None:
        """The new pending job; None (nothing created) when the account already has `max_pending` pending."""
        async with self.pool.acquire() as conn, conn.transaction():
            if max_pending is not None:
                # One submission of an account at a time counts and inserts: a burst cannot overrun the cap.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('pending-jobs:' || $1))", account_id)
                pending = await conn.fetchval(
                    "SELECT count(*) FROM jobs WHERE account_id = $1 AND status = 'pending'", account_id)
                if pending >= max_pending:
                    return None
            return await conn.fetchrow(
                "INSERT INTO jobs (job_id, account_id, voice_id, text, lang, backend, cache_key, response_format, "
                "status, characters, request, deadline_at, hold_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,'pending',$9, "
                "$10, now() + make_interval(secs => $11), $12) RETURNING *",
                job_id, account_id, voice_id, text, lang, backend, cache_key, response_format, len(text), request,
                deadline_s, hold_id)

    async def set_words(self, job_id: str, words: list[dict[str, Any]]) -> None:
        """The job's word timestamps (kept beside its audio; a cache hit asking for them reads them here)."""
        await self.pool.execute("UPDATE jobs SET words = $2 WHERE job_id = $1", job_id, words)

    async def has_words(self, job_id: str) -> bool:
        return bool(await self.pool.fetchval("SELECT words IS NOT NULL FROM jobs WHERE job_id = $1", job_id))

    async def get(self, job_id: str, account_id: str | None = None) -> asyncpg.Record | None:
        if account_id is None:
            return await self.pool.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
        return await self.pool.fetchrow("SELECT * FROM jobs WHERE job_id = $1 AND account_id = $2",
                                        job_id, account_id)

    async def pending_for(self, account_id: str, cache_key: str, response_format: str) -> asyncpg.Record | None:
        """An identical job in flight: same audio and the same format asked of it."""
        return await self.pool.fetchrow(
            "SELECT * FROM jobs WHERE account_id = $1 AND cache_key = $2 AND response_format = $3 "
            "AND status = 'pending' ORDER BY created_at LIMIT 1", account_id, cache_key, response_format)

    async def mark_ready(self, job_id: str, *, audio_key: str, expires_at: datetime | None,
                         synthesis_ms: int | None, audio_seconds: float | None,
                         synthesized_at: datetime | None = None,
                         stored_at: datetime | None = None) -> asyncpg.Record | None:
        """First terminal transition wins: only a pending job becomes ready."""
        return await self.pool.fetchrow(
            "UPDATE jobs SET status = 'ready', audio_key = $2, audio_expires_at = $3, synthesis_ms = $4, "
            "audio_seconds = $5, synthesized_at = $6, stored_at = $7, completed_at = now() "
            "WHERE job_id = $1 AND status = 'pending' AND completed_at IS NULL RETURNING *",
            job_id, audio_key, expires_at, synthesis_ms, audio_seconds, synthesized_at, stored_at)

    async def mark_failed(self, job_id: str, *, code: str, reason: str,
                          from_status: tuple[str, ...] = (PENDING,)) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "UPDATE jobs SET status = 'failed', error_code = $2, error = $3, completed_at = coalesce(completed_at, "
            "now()) WHERE job_id = $1 AND status = ANY($4::text[]) RETURNING *",
            job_id, code, reason, list(from_status))

    async def retry(self, job_id: str, *, deadline_s: float) -> asyncpg.Record | None:
        """Count one more attempt of a pending job and push its deadline out."""
        return await self.pool.fetchrow(
            "UPDATE jobs SET attempts = attempts + 1, deadline_at = now() + make_interval(secs => $2) "
            "WHERE job_id = $1 AND status = 'pending' RETURNING *", job_id, deadline_s)

    async def set_executor_ref(self, job_id: str, ref: str) -> None:
        await self.pool.execute("UPDATE jobs SET executor_ref = $2 WHERE job_id = $1", job_id, ref)

    async def overdue(self, limit: int = 100) -> list[asyncpg.Record]:
        """Claim pending jobs past their deadline; replicas skip each other's claims."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT job_id FROM jobs WHERE status = 'pending' AND deadline_at < now() "
                "ORDER BY deadline_at LIMIT $1 FOR UPDATE SKIP LOCKED", limit)
            if not rows:
                return []
            # Push the deadline a little so a parallel sweep does not pick them while we act.
            return await conn.fetch(
                "UPDATE jobs SET deadline_at = now() + interval '30 seconds' WHERE job_id = ANY($1::uuid[]) "
                "RETURNING *", [r["job_id"] for r in rows])

    async def fail_with_audio(self, audio_keys: list[str], *, code: str, reason: str) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "UPDATE jobs SET status = 'failed', error_code = $2, error = $3 WHERE audio_key = ANY($1::text[]) "
            "AND status = 'ready' RETURNING *", audio_keys, code, reason)

    async def delete_voice(self, account_id: str, voice_id: str) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "DELETE FROM jobs WHERE account_id = $1 AND voice_id = $2 RETURNING job_id, audio_key",
            account_id, voice_id)

    async def delete_account(self, account_id: str) -> list[asyncpg.Record]:
        return await self.pool.fetch("DELETE FROM jobs WHERE account_id = $1 RETURNING job_id, audio_key",
                                     account_id)

    async def delete_finished(self, *, older_than_s: float, limit: int = 500) -> list[asyncpg.Record]:
        """Delete up to `limit` jobs that ended more than `older_than_s` ago (their text with them)."""
        return await self.pool.fetch(
            "DELETE FROM jobs WHERE job_id IN (SELECT job_id FROM jobs WHERE status <> 'pending' "
            "AND completed_at < now() - make_interval(secs => $1) ORDER BY completed_at LIMIT $2 "
            "FOR UPDATE SKIP LOCKED) RETURNING job_id, account_id, audio_key", float(older_than_s), limit)


class CacheIndex:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def get(self, account_id: str, cache_key: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT * FROM cache_entries WHERE account_id = $1 AND cache_key = $2 "
            "AND (expires_at IS NULL OR expires_at > now())", account_id, cache_key)

    async def put(self, *, account_id: str, cache_key: str, voice_id: str, job_id: str, audio_key: str,
                  expires_at: datetime | None, synthesis_ms: int | None) -> None:
        await self.pool.execute(
            "INSERT INTO cache_entries (account_id, cache_key, voice_id, job_id, audio_key, expires_at, synthesis_ms) "
            "VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (account_id, cache_key) DO UPDATE SET job_id = $4, "
            "audio_key = $5, expires_at = $6, synthesis_ms = $7, created_at = now()",
            account_id, cache_key, voice_id, job_id, audio_key, expires_at, synthesis_ms)

    async def drop(self, account_id: str, cache_key: str) -> None:
        await self.pool.execute("DELETE FROM cache_entries WHERE account_id = $1 AND cache_key = $2",
                                account_id, cache_key)

    async def drop_audio(self, audio_keys: list[str]) -> int:
        status = await self.pool.execute("DELETE FROM cache_entries WHERE audio_key = ANY($1::text[])", audio_keys)
        return int(status.split()[-1])

    async def delete_voice(self, account_id: str, voice_id: str) -> list[str]:
        rows = await self.pool.fetch(
            "DELETE FROM cache_entries WHERE account_id = $1 AND voice_id = $2 RETURNING audio_key",
            account_id, voice_id)
        return [r["audio_key"] for r in rows]

    async def delete_account(self, account_id: str) -> int:
        status = await self.pool.execute("DELETE FROM cache_entries WHERE account_id = $1", account_id)
        return int(status.split()[-1])

    async def drop_jobs(self, job_ids: list[str]) -> int:
        status = await self.pool.execute("DELETE FROM cache_entries WHERE job_id = ANY($1::uuid[])", job_ids)
        return int(status.split()[-1])


