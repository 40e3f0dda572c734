"""Voices in PostgreSQL (schema `voices`)."""
from __future__ import annotations

from typing import Any

import asyncpg


class VoiceRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def add(self, *, voice_id: str, account_id: str, name: str, backend: str, lang: str,
                  ref_text: str | None, family: str | None, reference_key: str, quality: dict[str, Any],
                  metadata: dict[str, Any], max_voices: int | None = None) -> asyncpg.Record | None:
        """The new voice; None (nothing added) when the account already has `max_voices`."""
        async with self.pool.acquire() as conn, conn.transaction():
            if max_voices is not None:
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('voices:' || $1))", account_id)
                if await conn.fetchval("SELECT count(*) FROM voices WHERE account_id = $1", account_id) >= max_voices:
                    return None
            return await conn.fetchrow(
                "INSERT INTO voices (voice_id, account_id, name, backend, lang, ref_text, family, reference_key, "
                "quality, metadata) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) RETURNING *",
                voice_id, account_id, name, backend, lang, ref_text, family, reference_key, quality, metadata)

    async def count(self, account_id: str) -> int:
        return await self.pool.fetchval("SELECT count(*) FROM voices WHERE account_id = $1", account_id)

    async def get(self, account_id: str, voice_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT * FROM voices WHERE voice_id = $1 AND account_id = $2", voice_id, account_id)

    async def list(self, account_id: str, *, limit: int, after: str | None = None) -> list[asyncpg.Record]:
        """Up to `limit` voices in creation order, those after voice `after` (keyset: stable under inserts)."""
        if after is None:
            return await self.pool.fetch(
                "SELECT * FROM voices WHERE account_id = $1 ORDER BY created_at, voice_id LIMIT $2", account_id, limit)
        return await self.pool.fetch(
            "SELECT v.* FROM voices v, (SELECT created_at, voice_id FROM voices WHERE account_id = $1 "
            "AND voice_id = $3) c WHERE v.account_id = $1 AND (v.created_at, v.voice_id) > (c.created_at, c.voice_id) "
            "ORDER BY v.created_at, v.voice_id LIMIT $2", account_id, limit, after)

    async def delete(self, account_id: str, voice_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "DELETE FROM voices WHERE voice_id = $1 AND account_id = $2 RETURNING *", voice_id, account_id)

    async def set_profile(self, voice_id: str, backend: str, profile: dict[str, Any]) -> bool:
        status = await self.pool.execute(
            "UPDATE voices SET profile = profile || jsonb_build_object($2::text, $3::jsonb) WHERE voice_id = $1",
            voice_id, backend, profile)
        return status.endswith(" 1")

    async def delete_account(self, account_id: str) -> list[asyncpg.Record]:
        return await self.pool.fetch("DELETE FROM voices WHERE account_id = $1 RETURNING *", account_id)
