"""Idempotency keys in PostgreSQL (schema `gateway`): claim a key, store the answer, replay it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import asyncpg


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Claim:
    """What `begin` found: the caller runs the request (`started`), or answers from what is stored."""

    outcome: Literal["started", "replay", "mismatch", "in_progress"]
    stored: StoredResponse | None = None


class IdempotencyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def begin(self, account_id: str, key: str, fingerprint: str, *, ttl_s: float,
                    lock_s: float = 120.0) -> Claim:
        """Claim `key` for a request with this fingerprint, or say why it cannot run."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM idempotency_keys WHERE account_id = $1 AND expires_at < now()",
                               account_id)
            inserted = await conn.fetchval(
                "INSERT INTO idempotency_keys (account_id, idem_key, fingerprint, locked_until, expires_at) "
                "VALUES ($1, $2, $3, now() + make_interval(secs => $4), now() + make_interval(secs => $5)) "
                "ON CONFLICT (account_id, idem_key) DO NOTHING RETURNING 1",
                account_id, key, fingerprint, float(lock_s), float(ttl_s))
            if inserted:
                return Claim("started")
            row = await conn.fetchrow(
                "SELECT fingerprint, status_code, headers, body, locked_until < now() AS lapsed "
                "FROM idempotency_keys WHERE account_id = $1 AND idem_key = $2 FOR UPDATE", account_id, key)
            if row is None:  # abandoned between the insert and the select: the retry may go again at once
                return Claim("in_progress")
            if row["fingerprint"] != fingerprint:
                return Claim("mismatch")
            if row["status_code"] is not None:
                headers = [(str(k), str(v)) for k, v in (row["headers"] or [])]
                return Claim("replay", StoredResponse(row["status_code"], headers, bytes(row["body"] or b"")))
            if row["lapsed"]:
                # The first attempt's replica died mid-request; this retry takes the key over.
                await conn.execute(
                    "UPDATE idempotency_keys SET locked_until = now() + make_interval(secs => $3) "
                    "WHERE account_id = $1 AND idem_key = $2", account_id, key, float(lock_s))
                return Claim("started")
            return Claim("in_progress")

    async def complete(self, account_id: str, key: str, response: StoredResponse) -> None:
        """Keep the answer so a retry gets it back."""
        await self.pool.execute(
            "UPDATE idempotency_keys SET status_code = $3, headers = $4::jsonb, body = $5 "
            "WHERE account_id = $1 AND idem_key = $2",
            account_id, key, response.status_code, [list(h) for h in response.headers], response.body)

    async def abandon(self, account_id: str, key: str) -> None:
        """Free the key after a failed attempt, so a retry runs the request again."""
        await self.pool.execute(
            "DELETE FROM idempotency_keys WHERE account_id = $1 AND idem_key = $2 AND status_code IS NULL",
            account_id, key)

    async def purge_expired(self) -> int:
        status = await self.pool.execute("DELETE FROM idempotency_keys WHERE expires_at < now()")
        return int(status.split()[-1])
