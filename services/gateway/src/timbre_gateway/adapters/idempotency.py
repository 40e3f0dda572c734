"""Idempotency keys in PostgreSQL (schema `gateway`): claim a key under a lease, store the answer, replay it.

Audio answers are stored as a reference (the job and the format) and re-read on replay: a record holds a few
hundred bytes whatever the audio's length. Records go with their account's purge and their voice's deletion.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

import asyncpg


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    headers: list[tuple[str, str]]
    body: bytes
    # What the answer is about: the voice (deleting it deletes the record) and, for audio, the job and the
    # format to re-read on replay (then `body` is empty).
    voice_id: str | None = None
    job_id: str | None = None
    audio_format: str | None = None


@dataclass(frozen=True)
class Claim:
    """What `begin` found: the caller runs the request (`started`, holding `lease`), or answers from what is
    stored."""

    outcome: Literal["started", "replay", "mismatch", "in_progress"]
    stored: StoredResponse | None = None
    lease: str = field(default="")


class IdempotencyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def begin(self, account_id: str, key: str, fingerprint: str, *, ttl_s: float,
                    lease_s: float) -> Claim:
        """Claim `key` for a request with this fingerprint for `lease_s` (renew it while the request runs), or
        say why it cannot run."""
        lease = str(uuid.uuid4())
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM idempotency_keys WHERE account_id = $1 AND expires_at < now()",
                               account_id)
            inserted = await conn.fetchval(
                "INSERT INTO idempotency_keys (account_id, idem_key, fingerprint, locked_until, expires_at, "
                "lease_token) VALUES ($1, $2, $3, now() + make_interval(secs => $4), "
                "now() + make_interval(secs => $5), $6) ON CONFLICT (account_id, idem_key) DO NOTHING RETURNING 1",
                account_id, key, fingerprint, float(lease_s), float(ttl_s), lease)
            if inserted:
                return Claim("started", lease=lease)
            row = await conn.fetchrow(
                "SELECT fingerprint, status_code, headers, body, voice_id, job_id, audio_format, "
                "locked_until < now() AS lapsed FROM idempotency_keys WHERE account_id = $1 AND idem_key = $2 "
                "FOR UPDATE", account_id, key)
            if row is None:  # abandoned between the insert and the select: the retry may go again at once
                return Claim("in_progress")
            if row["fingerprint"] != fingerprint:
                return Claim("mismatch")
            if row["status_code"] is not None:
                headers = [(str(k), str(v)) for k, v in (row["headers"] or [])]
                return Claim("replay", StoredResponse(
                    row["status_code"], headers, bytes(row["body"] or b""), voice_id=row["voice_id"],
                    job_id=str(row["job_id"]) if row["job_id"] else None, audio_format=row["audio_format"]))
            if row["lapsed"]:
                # The first attempt's replica died mid-request (its lease was not renewed): this retry takes over.
                await conn.execute(
                    "UPDATE idempotency_keys SET locked_until = now() + make_interval(secs => $3), lease_token = $4 "
                    "WHERE account_id = $1 AND idem_key = $2", account_id, key, float(lease_s), lease)
                return Claim("started", lease=lease)
            return Claim("in_progress")

    async def renew(self, account_id: str, key: str, lease: str, *, lease_s: float) -> bool:
        """Extend a running request's claim; False when it is no longer this request's."""
        status = await self.pool.execute(
            "UPDATE idempotency_keys SET locked_until = now() + make_interval(secs => $4) "
            "WHERE account_id = $1 AND idem_key = $2 AND lease_token = $3 AND status_code IS NULL",
            account_id, key, lease, float(lease_s))
        return status.endswith(" 1")

    async def complete(self, account_id: str, key: str, response: StoredResponse, *, lease: str) -> bool:
        """Keep the answer so a retry gets it back (only while the claim is this request's)."""
        status = await self.pool.execute(
            "UPDATE idempotency_keys SET status_code = $3, headers = $4::jsonb, body = $5, voice_id = $6, "
            "job_id = $7, audio_format = $8 WHERE account_id = $1 AND idem_key = $2 AND lease_token = $9 "
            "AND status_code IS NULL",
            account_id, key, response.status_code, [list(h) for h in response.headers], response.body,
            response.voice_id, response.job_id, response.audio_format, lease)
        return status.endswith(" 1")

    async def abandon(self, account_id: str, key: str, *, lease: str) -> None:
        """Free the key after a failed attempt, so a retry runs the request again."""
        await self.pool.execute(
            "DELETE FROM idempotency_keys WHERE account_id = $1 AND idem_key = $2 AND status_code IS NULL "
            "AND lease_token = $3", account_id, key, lease)

    async def forget_voice(self, account_id: str, voice_id: str) -> int:
        """Drop the answers about a deleted voice: none of them may be replayed."""
        status = await self.pool.execute(
            "DELETE FROM idempotency_keys WHERE account_id = $1 AND voice_id = $2", account_id, voice_id)
        return int(status.split()[-1])

    async def purge_expired(self) -> int:
        status = await self.pool.execute("DELETE FROM idempotency_keys WHERE expires_at < now()")
        return int(status.split()[-1])
