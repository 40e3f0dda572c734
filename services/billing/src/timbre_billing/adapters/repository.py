"""Billing persistence on asyncpg; tables are unqualified and the pool's search_path picks the schema."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from ..domain import StoredSubscription, StripeEvent, SubscriptionSnapshot

# Served statuses first, then the latest period: the subscription that governs an account.
_GOVERNING_ORDER = (
    "ORDER BY (s.status IN ('active', 'trialing', 'past_due')) DESC,"
    " s.current_period_end DESC NULLS LAST, s.updated_at DESC LIMIT 1"
)


def _stored(row: asyncpg.Record | None) -> StoredSubscription | None:
    if row is None:
        return None
    return StoredSubscription(
        subscription_id=row["subscription_id"],
        customer_id=row["customer_id"],
        status=row["status"],
        current_period_start=row["current_period_start"],
        current_period_end=row["current_period_end"],
        last_event_created=row["last_event_created"],
    )


class BillingTransaction:
    """Statements that run inside one webhook transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def claim_event(self, event: StripeEvent) -> bool:
        """Record the event id; False when it was already recorded (the apply-once guard)."""
        row = await self._conn.fetchrow(
            "INSERT INTO stripe_events (event_id, type, created) VALUES ($1, $2, $3)"
            " ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            event.id,
            event.type,
            event.created,
        )
        return row is not None

    async def stored_outcome(self, event_id: str) -> tuple[str, dict[str, Any]]:
        """The outcome and actions recorded for an event."""
        row = await self._conn.fetchrow(
            "SELECT outcome, actions::text AS actions FROM stripe_events WHERE event_id = $1", event_id
        )
        return (row["outcome"], json.loads(row["actions"])) if row else ("ignored", {})

    async def finish_event(self, event_id: str, outcome: str, actions: Mapping[str, Any]) -> None:
        """Store what the event did, for redeliveries."""
        await self._conn.execute(
            "UPDATE stripe_events SET outcome = $2, actions = $3::text::jsonb WHERE event_id = $1",
            event_id,
            outcome,
            json.dumps(actions),
        )

    async def upsert_customer(self, customer_id: str, email: str | None) -> str | None:
        """Create or refresh a customer; returns its account id when already provisioned."""
        row = await self._conn.fetchrow(
            "INSERT INTO customers (customer_id, email) VALUES ($1, coalesce($2, ''))"
            " ON CONFLICT (customer_id) DO UPDATE"
            " SET email = coalesce($2, customers.email), updated_at = now()"
            " RETURNING account_id",
            customer_id,
            email.lower() if email else None,
        )
        return row["account_id"] if row else None

    async def assign_account(self, customer_id: str, account_id: str) -> str:
        """Give the customer `account_id` unless it has one; returns the account it ends up with."""
        return await self._conn.fetchval(
            "UPDATE customers SET account_id = coalesce(account_id, $2), updated_at = now()"
            " WHERE customer_id = $1 RETURNING account_id",
            customer_id,
            account_id,
        )

    async def link_customer(self, customer_id: str, account_id: str) -> None:
        """Tie a customer (not yet tied to another account) to `account_id`."""
        await self._conn.execute(
            "UPDATE customers SET account_id = $2, updated_at = now()"
            " WHERE customer_id = $1 AND (account_id IS NULL OR account_id = $2)",
            customer_id,
            account_id,
        )

    async def account_of_customer(self, customer_id: str) -> str | None:
        """The gateway account of a customer, when provisioned."""
        return await self._conn.fetchval(
            "SELECT account_id FROM customers WHERE customer_id = $1", customer_id
        )

    async def checkout_intent(self, token: str) -> tuple[bool, str | None]:
        """(known, account): whether Timbre started this checkout, and the account it was started for (None: a
        new account). Locked until the transaction ends, so two paid events of one checkout agree."""
        row = await self._conn.fetchrow(
            "SELECT account_id FROM checkout_tokens WHERE token = $1 FOR UPDATE", token
        )
        return (row is not None, row["account_id"] if row else None)

    async def lock_subscription(self, subscription_id: str) -> StoredSubscription | None:
        """The stored subscription, locked until the transaction ends."""
        row = await self._conn.fetchrow(
            "SELECT * FROM subscriptions WHERE subscription_id = $1 FOR UPDATE", subscription_id
        )
        return _stored(row)

    async def save_subscription(self, snap: SubscriptionSnapshot, event_created: int) -> None:
        """Write the subscription as of an event; the caller has checked ordering under the row lock."""
        await self._conn.execute(
            "INSERT INTO subscriptions (subscription_id, customer_id, status, current_period_start,"
            " current_period_end, last_event_created, canceled_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (subscription_id) DO UPDATE SET customer_id = $2, status = $3,"
            " current_period_start = coalesce($4, subscriptions.current_period_start),"
            " current_period_end = coalesce($5, subscriptions.current_period_end),"
            " last_event_created = greatest(subscriptions.last_event_created, $6),"
            " canceled_at = coalesce($7, subscriptions.canceled_at), updated_at = now()",
            snap.subscription_id,
            snap.customer_id,
            snap.status,
            snap.current_period_start,
            snap.current_period_end,
            event_created,
            snap.canceled_at,
        )

    async def mark_token_paid(
        self, token: str, email: str, session_id: str | None, customer_id: str, account_id: str
    ) -> None:
        """The checkout behind `token` was paid; a token unknown here (created elsewhere) is recorded."""
        await self._conn.execute(
            "INSERT INTO checkout_tokens (token, email, session_id, status, customer_id, account_id, paid_at)"
            " VALUES ($1, $2, $3, 'paid', $4, $5, now())"
            " ON CONFLICT (token) DO UPDATE"
            " SET status = 'paid', customer_id = $4, account_id = $5, paid_at = now(),"
            " session_id = coalesce(checkout_tokens.session_id, $3)"
            " WHERE checkout_tokens.status = 'open'",
            token,
            email,
            session_id,
            customer_id,
            account_id,
        )


class QuotaTransaction:
    """Statements that run while one account's quota lock is held."""

    def __init__(self, conn: asyncpg.Connection, account_id: str) -> None:
        self._conn, self._account_id = conn, account_id

    async def committed_characters(self, start: datetime, end: datetime, now: datetime) -> tuple[int, int]:
        """(used in [start, end), held by unexpired holds), read in one statement so one snapshot: a job.ready
        committing meanwhile moves its characters from held to used, never out of both."""
        row = await self._conn.fetchrow(
            "SELECT (SELECT coalesce(sum(characters), 0) FROM usage_ledger"
            "        WHERE account_id = $1 AND occurred_at >= $2 AND occurred_at < $3) AS used,"
            "       (SELECT coalesce(sum(characters), 0) FROM quota_holds"
            "        WHERE account_id = $1 AND expires_at > $4) AS held",
            self._account_id,
            start,
            end,
            now,
        )
        return int(row["used"]), int(row["held"])

    async def add_hold(self, hold_id: str, characters: int, now: datetime, expires_at: datetime) -> None:
        """Hold `characters` of the account's quota until a job consumes or releases them, or `expires_at`."""
        await self._conn.execute(
            "INSERT INTO quota_holds (hold_id, account_id, characters, created_at, expires_at)"
            " VALUES ($1, $2, $3, $4, $5)",
            hold_id,
            self._account_id,
            characters,
            now,
            expires_at,
        )

    async def drop_expired_holds(self, now: datetime) -> int:
        """Forget the account's expired holds (they no longer count; this only keeps the table small)."""
        status = await self._conn.execute(
            "DELETE FROM quota_holds WHERE account_id = $1 AND expires_at <= $2", self._account_id, now
        )
        return int(status.split()[-1])


class BillingRepository:
    """Customers, checkout tokens, subscriptions, the Stripe event log, the usage ledger and quota holds."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[BillingTransaction]:
        """One connection and one transaction for a webhook event."""
        async with self._pool.acquire() as conn, conn.transaction():
            yield BillingTransaction(conn)

    @asynccontextmanager
    async def quota_transaction(self, account_id: str) -> AsyncIterator[QuotaTransaction]:
        """One transaction holding the account's quota lock: concurrent checks of one account run one by one."""
        async with self._pool.acquire() as conn, conn.transaction():
            # A transaction-scoped advisory lock: released at commit or rollback, and needs no row to exist.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"quota:{account_id}")
            yield QuotaTransaction(conn, account_id)

    async def hold_stats(self) -> tuple[int, float]:
        """(unexpired holds, age in seconds of the oldest of them) across every account."""
        row = await self._pool.fetchrow(
            "SELECT count(*) AS holds, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest_s "
            "FROM quota_holds WHERE expires_at > now()")
        return int(row["holds"]), float(row["oldest_s"])

    async def release_hold(self, account_id: str, hold_id: str) -> bool:
        """Delete a hold; False when it was already gone (consumed, released or purged)."""
        status = await self._pool.execute(
            "DELETE FROM quota_holds WHERE hold_id = $1 AND account_id = $2", hold_id, account_id
        )
        return status != "DELETE 0"

    async def event_seen(self, event_id: str) -> bool:
        """Whether a Stripe event was already recorded."""
        return bool(await self._pool.fetchval("SELECT 1 FROM stripe_events WHERE event_id = $1", event_id))

    async def subscription(self, subscription_id: str) -> StoredSubscription | None:
        """One stored subscription."""
        sql = "SELECT * FROM subscriptions WHERE subscription_id = $1"
        row = await self._pool.fetchrow(sql, subscription_id)
        return _stored(row)

    async def customer_id_for_account(self, account_id: str) -> str | None:
        """The account's most recent Stripe customer (never looked up by email: an email names no account)."""
        return await self._pool.fetchval(
            "SELECT customer_id FROM customers WHERE account_id = $1 ORDER BY created_at DESC LIMIT 1", account_id
        )

    async def subscription_for_account(self, account_id: str) -> StoredSubscription | None:
        """The subscription governing an account's quota."""
        row = await self._pool.fetchrow(
            "SELECT s.* FROM customers c JOIN subscriptions s USING (customer_id) WHERE c.account_id = $1 "
            + _GOVERNING_ORDER,
            account_id,
        )
        return _stored(row)

    async def create_checkout_token(self, token: str, email: str, account_id: str | None = None) -> None:
        """Store a fresh one-time checkout token; `account_id` for an authenticated checkout (a renewal)."""
        await self._pool.execute("INSERT INTO checkout_tokens (token, email, account_id) VALUES ($1, $2, $3)",
                                 token, email, account_id)

    async def expire_open_checkouts(self, older_than_s: float) -> int:
        """Delete checkout tokens still open (never paid) after `older_than_s`; how many."""
        status = await self._pool.execute(
            "DELETE FROM checkout_tokens WHERE status = 'open' AND created_at < now() - make_interval(secs => $1)",
            float(older_than_s),
        )
        return int(status.split()[-1])

    async def attach_session(self, token: str, session_id: str) -> None:
        """Link a token to its Stripe Checkout Session."""
        await self._pool.execute(
            "UPDATE checkout_tokens SET session_id = $2 WHERE token = $1", token, session_id
        )

    async def checkout_token(self, token: str) -> asyncpg.Record | None:
        """A checkout token's status and, once paid, its customer and account."""
        return await self._pool.fetchrow(
            "SELECT status, account_id, customer_id, email FROM checkout_tokens WHERE token = $1", token
        )

    async def record_usage(
        self,
        job_id: str,
        account_id: str,
        characters: int,
        occurred_at: datetime,
        period_start: datetime,
        hold_id: str | None = None,
    ) -> bool:
        """Add a job's characters once and drop its hold in the same transaction, so the characters are never
        counted twice (held and used) nor in neither; False when the job was already recorded."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO usage_ledger (job_id, account_id, characters, occurred_at, period_start)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (job_id) DO NOTHING RETURNING job_id",
                job_id,
                account_id,
                characters,
                occurred_at,
                period_start,
            )
            if hold_id is not None:
                await conn.execute(
                    "DELETE FROM quota_holds WHERE hold_id = $1 AND account_id = $2", hold_id, account_id
                )
        return row is not None

    async def usage_between(self, account_id: str, start: datetime, end: datetime) -> tuple[int, int]:
        """(characters, jobs) of an account's jobs that occurred in [start, end)."""
        row = await self._pool.fetchrow(
            "SELECT coalesce(sum(characters), 0) AS characters, count(*) AS jobs FROM usage_ledger"
            " WHERE account_id = $1 AND occurred_at >= $2 AND occurred_at < $3",
            account_id,
            start,
            end,
        )
        return int(row["characters"]), int(row["jobs"])

    async def delete_account(self, account_id: str) -> int:
        """Every row of the account: usage, checkouts, subscriptions and the customer record."""
        async with self._pool.acquire() as conn, conn.transaction():
            usage = await conn.execute("DELETE FROM usage_ledger WHERE account_id = $1", account_id)
            await conn.execute("DELETE FROM quota_holds WHERE account_id = $1", account_id)
            await conn.execute("DELETE FROM checkout_tokens WHERE account_id = $1", account_id)
            customers = await conn.fetch("DELETE FROM customers WHERE account_id = $1 RETURNING customer_id",
                                         account_id)
            ids = [r["customer_id"] for r in customers]
            if ids:
                await conn.execute("DELETE FROM subscriptions WHERE customer_id = ANY($1::text[])", ids)
                await conn.execute("DELETE FROM checkout_tokens WHERE customer_id = ANY($1::text[])", ids)
        return int(usage.split()[-1]) + len(ids)
