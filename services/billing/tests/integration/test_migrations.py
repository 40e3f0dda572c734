"""Migration 002 on a database that 001 served: parked key plaintexts go, paid checkouts stay paid."""
from __future__ import annotations

import shutil
from pathlib import Path

import asyncpg
import pytest

from timbre_billing.adapters.repository import BillingRepository
from timbre_common.db import create_pool, drop_schema, migrate

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


async def test_002_drops_the_key_column_and_keeps_paid_checkouts(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    only_001 = tmp_path / "migrations"
    only_001.mkdir()
    shutil.copy(MIGRATIONS / "001_init.sql", only_001)
    pool = await create_pool(database_url, schema=schema, min_size=1, max_size=2)
    try:
        assert await migrate(pool, schema, only_001) == ["001_init.sql"]
        rows = [("t-open", "open", None, None), ("t-paid", "paid", "acc-1", None),
                ("t-ready", "ready", "acc-2", "tk_live_parked"), ("t-delivered", "delivered", "acc-3", None),
                ("t-expired", "expired", "acc-4", None)]
        for token, status, account, key in rows:
            await pool.execute(
                "INSERT INTO checkout_tokens (token, email, status, account_id, api_key)"
                " VALUES ($1, 'a@example.com', $2, $3, $4)", token, status, account, key)

        applied = await migrate(pool, schema, MIGRATIONS)
        assert applied and applied[0].startswith("002_")
        columns = {r["column_name"] for r in await pool.fetch(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = $1 AND table_name = 'checkout_tokens'", schema)}
        assert not columns & {"api_key", "ready_at", "delivered_at"} and {"token", "status"} <= columns
        statuses = dict(await pool.fetch("SELECT token, status FROM checkout_tokens"))
        assert statuses == {"t-open": "open", "t-paid": "paid", "t-ready": "paid", "t-delivered": "paid",
                            "t-expired": "paid"}
        repository = BillingRepository(pool)
        row = await repository.checkout_token("t-ready")
        assert row is not None and (row["status"], row["account_id"]) == ("paid", "acc-2")
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute("UPDATE checkout_tokens SET status = 'ready' WHERE token = 't-open'")
    finally:
        await pool.close()
        await drop_schema(database_url, schema)
