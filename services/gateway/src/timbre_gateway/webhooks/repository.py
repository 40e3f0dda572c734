"""Webhook endpoints, per-job targets, deliveries and their attempts in PostgreSQL (schema `gateway`)."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg


class WebhookRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # Endpoints ---------------------------------------------------------------------------------
    async def count_endpoints(self, account_id: str) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM webhook_endpoints WHERE account_id = $1",
                                            account_id))

    async def create_endpoint(self, *, account_id: str, url: str, events: list[str], description: str | None,
                              secret: str) -> asyncpg.Record | None:
        """The new endpoint; None when the account already has one at this URL."""
        return await self.pool.fetchrow(
            "INSERT INTO webhook_endpoints (webhook_id, account_id, url, events, description, secret) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (account_id, url) DO NOTHING RETURNING *",
            str(uuid.uuid4()), account_id, url, events, description, secret)

    async def list_endpoints(self, account_id: str) -> list[asyncpg.Record]:
        return await self.pool.fetch("SELECT * FROM webhook_endpoints WHERE account_id = $1 ORDER BY created_at, "
                                     "webhook_id", account_id)

    async def get_endpoint(self, account_id: str, webhook_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM webhook_endpoints WHERE account_id = $1 AND webhook_id = $2",
                                        account_id, webhook_id)

    async def endpoint_by_url(self, account_id: str, url: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM webhook_endpoints WHERE account_id = $1 AND url = $2",
                                        account_id, url)

    async def delete_endpoint(self, account_id: str, webhook_id: str) -> bool:
        """The endpoint, its job targets and its deliveries (pending ones are then dropped by the consumer)."""
        async with self.pool.acquire() as conn, conn.transaction():
            deleted = await conn.execute("DELETE FROM webhook_endpoints WHERE account_id = $1 AND webhook_id = $2",
                                         account_id, webhook_id)
            if deleted.endswith(" 0"):
                return False
            await conn.execute("DELETE FROM webhook_deliveries WHERE webhook_id = $1", webhook_id)
        return True

    async def rotate_secret(self, account_id: str, webhook_id: str, secret: str,
                            grace_s: float) -> asyncpg.Record | None:
        """A new secret; the current one keeps signing for `grace_s` seconds."""
        return await self.pool.fetchrow(
            "UPDATE webhook_endpoints SET previous_secret = secret, secret = $3, "
            "previous_secret_expires_at = now() + make_interval(secs => $4) "
            "WHERE account_id = $1 AND webhook_id = $2 RETURNING *", account_id, webhook_id, secret, float(grace_s))

    async def signing_secrets(self, webhook_id: str) -> list[str] | None:
        """The secrets that sign now: the current one, and the previous one while its grace lasts."""
        row = await self.pool.fetchrow(
            "SELECT secret, CASE WHEN previous_secret_expires_at > now() THEN previous_secret END AS previous "
            "FROM webhook_endpoints WHERE webhook_id = $1", webhook_id)
        if row is None:
            return None
        return [row["secret"], *([row["previous"]] if row["previous"] else [])]

    # Targets of one job ------------------------------------------------------------------------
    async def attach_job(self, job_id: str, webhook_id: str, account_id: str) -> None:
        await self.pool.execute("INSERT INTO webhook_job_targets (job_id, webhook_id, account_id) "
                                "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", job_id, webhook_id, account_id)

    async def endpoints_for(self, account_id: str, event_type: str, job_id: str | None = None) -> list[asyncpg.Record]:
        """Endpoints subscribed to `event_type`, and those a request named for this job."""
        return await self.pool.fetch(
            "SELECT * FROM webhook_endpoints e WHERE e.account_id = $1 AND ($2 = ANY(e.events) OR ($3::uuid IS NOT "
            "NULL AND EXISTS (SELECT 1 FROM webhook_job_targets t WHERE t.job_id = $3::uuid "
            "AND t.webhook_id = e.webhook_id)))", account_id, event_type, job_id)

    # Deliveries --------------------------------------------------------------------------------
    async def create_deliveries(self, *, event_id: str, event_type: str, account_id: str, payload: str,
                                endpoints: list[asyncpg.Record], snapshot_secrets: bool = False,
                                conn: Any = None) -> list[asyncpg.Record]:
        """One delivery per endpoint; those made before (a redelivered event) are not made again."""
        made = []
        db = conn or self.pool
        for e in endpoints:
            row = await db.fetchrow(
                "INSERT INTO webhook_deliveries (delivery_id, event_id, event_type, webhook_id, account_id, url, "
                "payload, secrets_snapshot) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                "ON CONFLICT (event_id, webhook_id) DO NOTHING RETURNING *",
                str(uuid.uuid4()), event_id, event_type, e["webhook_id"], account_id, e["url"], payload,
                [e["secret"], *([e["previous_secret"]] if e["previous_secret"] else [])] if snapshot_secrets
                else None)
            if row is not None:
                made.append(row)
        return made

    async def purge_account(self, *, account_id: str, event_id: str, payload: str) -> tuple[list[asyncpg.Record],
                                                                                             int]:
        """Queue account.purged to the endpoints that want it (their URL and secrets copied into the delivery),
        then remove every endpoint, target and other delivery of the account; (deliveries made, rows removed)."""
        async with self.pool.acquire() as conn, conn.transaction():
            wanting = await conn.fetch("SELECT * FROM webhook_endpoints WHERE account_id = $1 "
                                       "AND 'account.purged' = ANY(events)", account_id)
            made = await self.create_deliveries(event_id=event_id, event_type="account.purged",
                                                account_id=account_id, payload=payload, endpoints=wanting,
                                                snapshot_secrets=True, conn=conn)
            removed = 0
            for sql in ("DELETE FROM webhook_deliveries WHERE account_id = $1 AND event_type <> 'account.purged'",
                        "DELETE FROM webhook_job_targets WHERE account_id = $1",
                        "DELETE FROM webhook_endpoints WHERE account_id = $1"):
                removed += int((await conn.execute(sql, account_id)).split()[-1])
        return made, removed

    async def get_delivery(self, delivery_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM webhook_deliveries WHERE delivery_id = $1", delivery_id)

    async def claim_attempt(self, delivery_id: str, attempts_made: int) -> asyncpg.Record | None:
        """Take attempt `attempts_made + 1`; None when another copy of the message took it, or it ended."""
        return await self.pool.fetchrow(
            "UPDATE webhook_deliveries SET attempts = attempts + 1 WHERE delivery_id = $1 AND attempts = $2 "
            "AND status = 'pending' RETURNING *", delivery_id, attempts_made)

    async def record_attempt(self, *, delivery_id: str, attempt: int, started_at: datetime, duration_ms: int,
                             status_code: int | None, error: str | None, response: str | None, outcome: str,
                             next_attempt_at: datetime | None) -> None:
        """The attempt's answer, and the delivery's new state (`delivered`, `pending` again, or `parked`)."""
        async with self.pool.acquire() as conn, conn.transaction():
            # The delivery may have gone meanwhile (its endpoint deleted, its account purged): then nothing to note.
            await conn.execute(
                "INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, status_code, error, "
                "response) SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM webhook_deliveries "
                "WHERE delivery_id = $1) ON CONFLICT DO NOTHING",
                delivery_id, attempt, started_at, duration_ms, status_code, error, response)
            await conn.execute(
                "UPDATE webhook_deliveries SET status = $2, last_status = $3, last_error = $4, "
                "next_attempt_at = coalesce($5, next_attempt_at), "
                "completed_at = CASE WHEN $2 = 'pending' THEN NULL ELSE now() END WHERE delivery_id = $1",
                delivery_id, outcome, status_code, error, next_attempt_at)
            # The farewell to a purged account is its last row here: once it ends, nothing of the account stays.
            if outcome != "pending":
                await conn.execute("DELETE FROM webhook_deliveries WHERE delivery_id = $1 "
                                   "AND secrets_snapshot IS NOT NULL", delivery_id)

    async def list_deliveries(self, account_id: str, webhook_id: str, *, limit: int) -> list[asyncpg.Record]:
        """The endpoint's latest deliveries, newest first, each with its attempts."""
        return await self.pool.fetch(
            "SELECT d.*, coalesce((SELECT json_agg(json_build_object('attempt', a.attempt, 'started_at', "
            "a.started_at, 'duration_ms', a.duration_ms, 'status_code', a.status_code, 'error', a.error, "
            "'response', a.response) ORDER BY a.attempt) FROM webhook_attempts a "
            "WHERE a.delivery_id = d.delivery_id), '[]'::json) AS attempt_log "
            "FROM webhook_deliveries d WHERE d.account_id = $1 AND d.webhook_id = $2 "
            "ORDER BY d.created_at DESC, d.delivery_id LIMIT $3", account_id, webhook_id, limit)

    async def stalled_deliveries(self, *, overdue_s: float, limit: int = 500) -> list[asyncpg.Record]:
        """Pending deliveries long past due, their due time moved to now so the next sweep leaves them be: their
        message was lost (a crash between recording and publishing) and is sent again."""
        return await self.pool.fetch(
            "UPDATE webhook_deliveries SET next_attempt_at = now() WHERE delivery_id IN (SELECT delivery_id "
            "FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at < now() - make_interval(secs => $1) "
            "ORDER BY next_attempt_at LIMIT $2) RETURNING delivery_id, account_id, attempts, next_attempt_at",
            float(overdue_s), limit)
