"""Accounts, keys and purges in PostgreSQL (schema `gateway`)."""
from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from timbre_common.logging import get_logger

from ..domain import hash_api_key, mint_api_key
from .sealing import CheckoutKeySealer, Unreadable

log = get_logger(__name__)


class AccountRepository:
    def __init__(self, pool: asyncpg.Pool, sealer: CheckoutKeySealer | None = None) -> None:
        self.pool = pool
        # Checkout keys are stored sealed only; without a sealer this repository cannot store or read them.
        self.sealer = sealer

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

    async def list_keys(self, account_id: str | None = None, *, limit: int = 100,
                        after: str | None = None) -> list[asyncpg.Record]:
        """Keys in creation order, optionally of one account, those after key `after` (a keyset page)."""
        return await self.pool.fetch(
            "SELECT k.* FROM api_keys k WHERE ($1::uuid IS NULL OR k.account_id = $1::uuid) AND ($2::uuid IS NULL "
            "OR (k.created_at, k.key_id) > (SELECT created_at, key_id FROM api_keys WHERE key_id = $2::uuid)) "
            "ORDER BY k.created_at, k.key_id LIMIT $3", account_id, after, limit)

    async def revoke_key(self, key_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1 RETURNING *", key_id)

    async def update_key_limits(self, key_id: str, changes: dict[str, int | None]) -> asyncpg.Record | None:
        """Set the key's own rate/concurrency limits (None: back to the deployment default)."""
        allowed = {"rate_per_minute", "max_concurrent"}
        names = [n for n in changes if n in allowed]
        if not names:
            return await self.pool.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", key_id)
        assignments = ", ".join(f"{n} = ${i + 2}" for i, n in enumerate(names))
        return await self.pool.fetchrow(f"UPDATE api_keys SET {assignments} WHERE key_id = $1 RETURNING *",
                                        key_id, *(changes[n] for n in names))

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
            # Nothing of a purged account stays replayable.
            await conn.execute("DELETE FROM idempotency_keys WHERE account_id = $1", account_id)
            await conn.execute("DELETE FROM accounts WHERE account_id = $1", account_id)
        return int(keys.split()[-1])

    # Purges ------------------------------------------------------------------------------------
    async def start_purge(self, account_id: str) -> str:
        purge_id = str(uuid.uuid4())
        await self.pool.execute("INSERT INTO purges (purge_id, account_id) VALUES ($1, $2)", purge_id, account_id)
        return purge_id

    async def confirm_purge(self, purge_id: str, service: str, removed: int, required: tuple[str, ...]) -> None:
        # The first confirmation of each service wins: a redelivered purge (which removes 0) cannot overwrite it.
        await self.pool.execute(
            "UPDATE purges SET confirmed = jsonb_build_object($2::text, $3::int) || confirmed, "
            "completed_at = CASE WHEN (jsonb_build_object($2::text, $3::int) || confirmed) ?& $4::text[] "
            "THEN coalesce(completed_at, now()) END WHERE purge_id = $1", purge_id, service, removed, list(required))

    async def get_purge(self, purge_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM purges WHERE purge_id = $1", purge_id)

    async def unfinished_purges(self, *, older_than_s: float, within_s: float) -> list[asyncpg.Record]:
        """Purges some service has not confirmed a while after they were asked for (up to `within_s` old)."""
        return await self.pool.fetch(
            "SELECT purge_id, account_id, confirmed FROM purges WHERE completed_at IS NULL AND failed_at IS NULL "
            "AND requested_at < now() - make_interval(secs => $1) AND requested_at > now() - make_interval(secs => $2)",
            older_than_s, within_s)

    async def fail_overdue_purges(self, *, deadline_s: float, required: tuple[str, ...]) -> list[asyncpg.Record]:
        """Purges still unconfirmed `deadline_s` after they were asked for end `failed`, naming who never
        confirmed; returns them (each once)."""
        return await self.pool.fetch(
            "UPDATE purges SET failed_at = now(), missing = ARRAY(SELECT unnest($2::text[]) EXCEPT "
            "SELECT jsonb_object_keys(confirmed) ORDER BY 1) "
            "WHERE completed_at IS NULL AND failed_at IS NULL AND requested_at <= now() - make_interval(secs => $1) "
            "RETURNING purge_id, account_id, requested_at, confirmed, missing", deadline_s, list(required))

    # Keys minted after a checkout ------------------------------------------------------------------
    def _sealer(self) -> CheckoutKeySealer:
        if self.sealer is None:
            raise RuntimeError("checkout keys need a sealer (CHECKOUT_KEY_SECRET)")
        return self.sealer

    async def store_checkout_key(self, token: str, account_id: str, api_key: str) -> None:
        """Keep the key for the success page's single read, sealed (never its plaintext)."""
        sealed = self._sealer().seal(token, api_key)
        await self.pool.execute(
            "INSERT INTO checkout_keys (checkout_token, account_id, api_key) VALUES ($1, $2, $3) "
            "ON CONFLICT (checkout_token) DO NOTHING", token, account_id, sealed)

    async def checkout_key_stored(self, token: str) -> bool:
        """True once a key was minted for this checkout (shown or not)."""
        return bool(await self.pool.fetchval("SELECT 1 FROM checkout_keys WHERE checkout_token = $1", token))

    async def take_checkout_key(self, token: str, *, max_age_s: float,
                                account_id: str | None = None) -> dict[str, Any] | None:
        """The key once (opened from its sealed form): the first read erases it; one older than `max_age_s` is
        erased unread. With `account_id`, only a key minted on that account (the one billing says was paid for).

        `shown_at` stays None for a key that expired before anyone read it.
        """
        # FOR UPDATE makes a concurrent read wait and then see the erased key; a plain self-join would
        # re-check only the target row and hand the old plaintext to both readers.
        row = await self.pool.fetchrow(
            "WITH taken AS (SELECT checkout_token, CASE WHEN created_at >= now() - make_interval(secs => $2) "
            "THEN api_key END AS api_key FROM checkout_keys WHERE checkout_token = $1 "
            "AND ($3::uuid IS NULL OR account_id = $3::uuid) FOR UPDATE) "
            "UPDATE checkout_keys c SET api_key = NULL, shown_at = CASE WHEN taken.api_key IS NULL "
            "THEN c.shown_at ELSE coalesce(c.shown_at, now()) END FROM taken "
            "WHERE c.checkout_token = taken.checkout_token "
            "RETURNING taken.api_key AS api_key, c.account_id, c.shown_at", token, float(max_age_s), account_id)
        if row is None:
            return None
        taken = dict(row)
        if taken["api_key"] is not None:
            try:
                taken["api_key"] = self._sealer().open(token, taken["api_key"])
            except Unreadable:
                # Sealed under another secret (CHECKOUT_KEY_SECRET changed): it is erased now and cannot be shown.
                log.error("checkout_key_unreadable", account=str(taken["account_id"]))
                taken["api_key"] = None
        return taken

    async def erase_expired_checkout_keys(self, *, max_age_s: float) -> int:
        """Erase the plaintext of every checkout key older than `max_age_s` that nobody read; how many."""
        # The row stays: it tells a redelivered provisioning request that this checkout already has its key.
        status = await self.pool.execute(
            "UPDATE checkout_keys SET api_key = NULL WHERE api_key IS NOT NULL "
            "AND created_at < now() - make_interval(secs => $1)", float(max_age_s))
        return int(status.split()[-1])
