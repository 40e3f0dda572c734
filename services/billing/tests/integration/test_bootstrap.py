"""bootstrap.build wires a migrated repository and, with billing on, the Stripe gateway."""
from __future__ import annotations

import asyncpg

from timbre_billing import bootstrap
from timbre_billing.adapters.stripe_gateway import StripeGateway
from timbre_billing.settings import BillingSettings


async def test_build_with_billing_on_and_off(
    pool: asyncpg.Pool, schema: str, settings_on: BillingSettings, settings_off: BillingSettings
) -> None:
    on = await bootstrap.build(settings_on, pool=pool, schema=schema)
    assert isinstance(on.stripe, StripeGateway)
    await on.stripe.aclose()
    off = await bootstrap.build(settings_off, pool=pool, schema=schema)  # migrating twice is a no-op
    assert off.stripe is None
    migrations = sorted(p.name for p in bootstrap.MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.sql"))
    assert len(migrations) >= 2
    applied = await pool.fetch("SELECT name FROM schema_migrations ORDER BY name")
    assert [r["name"] for r in applied] == migrations
