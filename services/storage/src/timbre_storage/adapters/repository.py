"""Object index in PostgreSQL (schema `storage`, tables objects and uploads)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from timbre_storage.domain import AccountLimits, ObjectKind, RetentionClass, StoredObject, UploadPurpose

MIGRATIONS_DIR = Path(__file__).resolve().parents[3] / "migrations"

_COLUMNS = "key, account_id, kind, retention, content_type, size, created_at, expires_at, owner_ref"


@dataclass(frozen=True, slots=True)
class Upload:
    """One client upload and the key its bytes live under."""

    upload_id: str
    account_id: str
    purpose: UploadPurpose
    key: str
    created_at: datetime


def _object(row: asyncpg.Record) -> StoredObject:
    return StoredObject(
        key=row["key"],
        size=row["size"],
        expires_at=row["expires_at"],
        account_id=row["account_id"],
        kind=ObjectKind(row["kind"]),
        retention=RetentionClass(row["retention"]),
        content_type=row["content_type"],
        created_at=row["created_at"],
        owner_ref=row["owner_ref"],
    )


def _upload(row: asyncpg.Record) -> Upload:
    return Upload(
        upload_id=row["upload_id"],
        account_id=row["account_id"],
        purpose=UploadPurpose(row["purpose"]),
        key=row["key"],
        created_at=row["created_at"],
    )


class ObjectRepository:
    """The index of every object in the bucket; tables resolved through the pool's search_path."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @staticmethod
    async def _upsert(conn: asyncpg.Connection, obj: StoredObject) -> StoredObject:
        # A rewrite of the same key keeps its first created_at/expires_at: a redelivery answers the same.
        row = await conn.fetchrow(
            f"""
            INSERT INTO objects ({_COLUMNS})
            VALUES ($1, $2, $3, $4, $5, $6, coalesce($7, now()), $8, $9)
            ON CONFLICT (key) DO UPDATE SET size = EXCLUDED.size, content_type = EXCLUDED.content_type
            RETURNING {_COLUMNS}
            """,
            obj.key,
            obj.account_id,
            obj.kind.value,
            obj.retention.value,
            obj.content_type,
            obj.size,
            obj.created_at,
            obj.expires_at,
            obj.owner_ref,
        )
        return _object(row)

    @staticmethod
    async def _within_limits(conn: asyncpg.Connection, obj: StoredObject, limits: AccountLimits | None, *,
                             adding_upload: bool) -> None:
        """Check the account's caps with its other writes held off (a transaction-scoped lock per account)."""
        if limits is None or obj.account_id is None:
            return
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('storage-quota:' || $1))", obj.account_id)
        usage = await conn.fetchrow(
            """
            SELECT count(u.upload_id) AS uploads, coalesce(sum(o.size), 0) AS bytes
            FROM objects o LEFT JOIN uploads u ON u.key = o.key
            WHERE o.account_id = $1 AND o.kind = ANY($2::text[]) AND o.key <> $3
              AND (o.expires_at IS NULL OR o.expires_at > now())
            """,
            obj.account_id,
            [ObjectKind.UPLOAD.value, ObjectKind.VOICE_RECORDING.value, ObjectKind.CUSTOM_VOICE.value],
            obj.key,
        )
        limits.check(uploads=usage["uploads"], stored_bytes=int(usage["bytes"]), adding_bytes=obj.size,
                     adding_upload=adding_upload)

    async def record(self, obj: StoredObject, *, limits: AccountLimits | None = None) -> StoredObject:
        """Insert the row, or update size/content type of an existing key; returns the stored row.

        With `limits`, refuses (QuotaExceeded) a write that would pass the account's byte cap."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self._within_limits(conn, obj, limits, adding_upload=False)
            return await self._upsert(conn, obj)

    async def record_upload(self, obj: StoredObject, *, upload_id: str, purpose: UploadPurpose,
                            limits: AccountLimits | None = None) -> Upload:
        """Record an upload's object and its uploads row in one transaction; idempotent per upload_id.

        With `limits`, a new upload past the account's count or byte cap is refused (QuotaExceeded)."""
        async with self._pool.acquire() as conn, conn.transaction():
            known = await conn.fetchval("SELECT 1 FROM uploads WHERE upload_id = $1", upload_id)
            await self._within_limits(conn, obj, limits, adding_upload=known is None)
            await self._upsert(conn, obj)
            await conn.execute(
                """
                INSERT INTO uploads (upload_id, account_id, purpose, key, created_at)
                VALUES ($1, $2, $3, $4, coalesce($5, now()))
                ON CONFLICT (upload_id) DO NOTHING
                """,
                upload_id,
                obj.account_id,
                purpose.value,
                obj.key,
                obj.created_at,
            )
            row = await conn.fetchrow(
                "SELECT upload_id, account_id, purpose, key, created_at FROM uploads WHERE upload_id = $1",
                upload_id,
            )
            return _upload(row)

    async def get_upload(self, upload_id: str) -> Upload | None:
        """The upload with this id, if any."""
        row = await self._pool.fetchrow(
            "SELECT upload_id, account_id, purpose, key, created_at FROM uploads WHERE upload_id = $1",
            upload_id,
        )
        return None if row is None else _upload(row)

    async def claim_upload(self, account_id: str, upload_id: str, voice_id: str) -> str | None:
        """A voice keeps the upload it was made from: the upload no longer expires; returns its key."""
        async with self._pool.acquire() as conn, conn.transaction():
            key = await conn.fetchval(
                "UPDATE uploads SET voice_id = $3 WHERE upload_id = $1 AND account_id = $2 RETURNING key",
                upload_id, account_id, voice_id)
            if key is not None:
                await conn.execute("UPDATE objects SET expires_at = NULL WHERE key = $1", key)
            return key

    async def claimed_upload_keys(self, account_id: str, voice_id: str) -> list[str]:
        """Keys of the uploads a voice claimed."""
        rows = await self._pool.fetch("SELECT key FROM uploads WHERE account_id = $1 AND voice_id = $2",
                                      account_id, voice_id)
        return [row["key"] for row in rows]

    async def get(self, key: str) -> StoredObject | None:
        """The index row of a key, if any."""
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM objects WHERE key = $1", key)
        return None if row is None else _object(row)

    async def delete(self, key: str) -> bool:
        """Delete one row (its upload row goes with it); True if it existed."""
        return await self._pool.fetchval("DELETE FROM objects WHERE key = $1 RETURNING true", key) is not None

    @asynccontextmanager
    async def claim_expired(self, now: datetime, limit: int) -> AsyncIterator[list[StoredObject]]:
        """Delete up to `limit` expired rows, committed only when the block exits cleanly.

        Rows locked by another sweeper are skipped, so replicas never handle the same row; if the
        block raises (a bucket delete failed) the rows come back for the next sweep.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"""
                DELETE FROM objects WHERE key IN (
                    SELECT key FROM objects
                    WHERE expires_at IS NOT NULL AND expires_at <= $1
                    ORDER BY expires_at
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                )
                RETURNING {_COLUMNS}
                """,
                now,
                limit,
            )
            yield [_object(row) for row in rows]

    async def delete_account(self, account_id: str) -> list[str]:
        """Delete every row of the account (objects and uploads); returns the keys."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM uploads WHERE account_id = $1", account_id)
            rows = await conn.fetch("DELETE FROM objects WHERE account_id = $1 RETURNING key", account_id)
            return [row["key"] for row in rows]

    async def keys_of_account(self, account_id: str) -> list[str]:
        """Keys the index holds for the account."""
        rows = await self._pool.fetch("SELECT key FROM objects WHERE account_id = $1 ORDER BY key", account_id)
        return [row["key"] for row in rows]
