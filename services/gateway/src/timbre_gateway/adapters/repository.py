"""Accounts, keys and purges in PostgreSQL (schema `gateway`)."""
from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from ..domain import hash_api_key, mint_api_key


class AccountRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create_key(self, *, label: str | None, account_id: str | None = None, email: str | None = None,
                         rate_per_minute: int | None = None,
                         max_concurrent: int | None = None) -> tuple[str, asyncpg.Record]:
        """A new key, on a new account unless one is named; returns (plaintext, key row)."""
        key = mint_api_key()
        async with self.pool.acquire() as conn, conn.transaction():
            if account_id is None:
                account_id = str(uuid.uuid4())
                await conn.execute("INSERT INTO accounts (account_id, label, email) VALUES ($1, $2, $3)",
                                   account_id, label, email)
            else:
                await conn.execute("INSERT INTO accounts (account_id, label, email) VALUES ($1, $2, $3) "
                                   "ON CONFLICT (account_id) DO NOTHING", account_id, label, email)
            row = await conn.fetchrow(
                "INSERT INTO api_keys (key_id, account_id, key_hash, key_prefix, label, rate_per_minute, "
                "max_concurrent) VALUES ($1,$2,$3,$4,$5,$6,$7) RETURNING *",
                str(uuid.uuid4()), account_id, hash_api_key(key), key[:10], label, rate_per_minute, max_concurrent)
        return key, row

    async def authenticate(self, key: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT k.*, a.status AS account_status FROM api_keys k JOIN accounts a USING (account_id) "
            "WHERE k.key_hash = $1 AND k.revoked_at IS NULL", hash_api_key(key))

    async def list_keys(self, account_id: str | None = None) -> list[asyncpg.Record]:
        if account_id:
            return await self.pool.fetch("SELECT * FROM api_keys WHERE account_id = $1 ORDER BY created_at",
                                         account_id)
        return await self.pool.fetch("SELECT * FROM api_keys ORDER BY created_at")

    async def revoke_key(self, key_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1 RETURNING *", key_id)

    async def revoke_account_keys(self, account_id: str) -> int:
        status = await self.pool.execute(
            "UPDATE accounts SET status = 'suspended' WHERE account_id = $1", account_id)
        return int(status.split()[-1])

    async def restore_account(self, account_id: str) -> None:
        await self.pool.execute("UPDATE accounts SET status = 'active' WHERE account_id = $1", account_id)

    async def account_exists(self, account_id: str) -> bool:
        return bool(await self.pool.fetchval("SELECT 1 FROM accounts WHERE account_id = $1", account_id))

    async def delete_account(self, account_id: str) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            keys = await conn.execute("DELETE FROM api_keys WHERE account_id = $1", account_id)
            await conn.execute("DELETE FROM checkout_keys WHERE account_id = $1", account_id)
            await conn.execute("DELETE FROM accounts WHERE account_id = $1", account_id)
        return int(keys.split()[-1])

    # Purges ------------------------------------------------------------------------------------
    async def start_purge(self, account_id: str) -> str:
        purge_id = str(uuid.uuid4())
        await self.pool.execute("INSERT INTO purges (purge_id, account_id) VALUES ($1, $2)", purge_id, account_id)
        return purge_id

    async def confirm_purge(self, purge_id: str, service: str, removed: int, required: tuple[str, ...]) -> None:
        await self.pool.execute(
            "UPDATE purges SET confirmed = confirmed || jsonb_build_object($2::text, $3::int), "
            "completed_at = CASE WHEN (confirmed || jsonb_build_object($2::text, $3::int)) ?& $4::text[] "
            "THEN coalesce(completed_at, now()) END WHERE purge_id = $1", purge_id, service, removed, list(required))

    async def get_purge(self, purge_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM purges WHERE purge_id = $1", purge_id)

    # Keys minted after a checkout ------------------------------------------------------------------
    async def store_checkout_key(self, token: str, account_id: str, api_key: str) -> None:
        await self.pool.execute(
            "INSERT INTO checkout_keys (checkout_token, account_id, api_key) VALUES ($1, $2, $3) "
            "ON CONFLICT (checkout_token) DO NOTHING", token, account_id, api_key)

    async def take_checkout_key(self, token: str) -> dict[str, Any] | None:
        """The plaintext key once: the first read erases it."""
        row = await self.pool.fetchrow(
            "UPDATE checkout_keys c SET api_key = NULL, shown_at = now() FROM checkout_keys old "
            "WHERE c.checkout_token = $1 AND old.checkout_token = c.checkout_token "
            "RETURNING old.api_key AS api_key, c.account_id, c.shown_at", token)
        return dict(row) if row else None
