"""The one-time checkout key against real PostgreSQL: read once, erased unread after its TTL, swept."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from timbre_common.db import create_pool, migrate
from timbre_gateway import handlers
from timbre_gateway.adapters.backends import BackendRegistry
from timbre_gateway.adapters.repository import AccountRepository
from timbre_gateway.adapters.sealing import CheckoutKeySealer
from timbre_gateway.bootstrap import MIGRATIONS, GatewayContext, GatewayService
from timbre_gateway.settings import GatewaySettings

DAY = 24 * 3600.0


@pytest.fixture
async def accounts(database_url: str, pg_schema: str) -> AsyncIterator[AccountRepository]:
    pool = await create_pool(database_url, schema=pg_schema, min_size=1, max_size=4)
    await migrate(pool, pg_schema, MIGRATIONS)
    yield AccountRepository(pool, sealer=CheckoutKeySealer("checkout-sealing-secret-for-tests"))
    await pool.close()


async def _minted(accounts: AccountRepository, token: str, *, age_s: float = 0.0) -> str:
    """A checkout key stored for `token` as if minted `age_s` ago; returns its plaintext."""
    account_id = str(uuid.uuid4())
    key, _ = await accounts.create_key(label="checkout", account_id=account_id)
    await accounts.store_checkout_key(token, account_id, key)
    await accounts.pool.execute(
        "UPDATE checkout_keys SET created_at = now() - make_interval(secs => $2) WHERE checkout_token = $1",
        token, age_s)
    return key


async def _plaintext(accounts: AccountRepository, token: str) -> str | None:
    return await accounts.pool.fetchval("SELECT api_key FROM checkout_keys WHERE checkout_token = $1", token)


async def test_a_fresh_key_is_shown_once(accounts: AccountRepository) -> None:
    key = await _minted(accounts, "tok-fresh", age_s=DAY - 60)
    first = await accounts.take_checkout_key("tok-fresh", max_age_s=DAY)
    second = await accounts.take_checkout_key("tok-fresh", max_age_s=DAY)
    assert first is not None and first["api_key"] == key and first["shown_at"] is not None
    assert second is not None and second["api_key"] is None and second["shown_at"] == first["shown_at"]
    assert await _plaintext(accounts, "tok-fresh") is None
    assert await accounts.take_checkout_key("tok-unknown", max_age_s=DAY) is None


async def test_the_key_is_stored_sealed_never_in_plaintext(accounts: AccountRepository) -> None:
    """A copy of the table (a backup, a replica) holds nothing that authenticates."""
    key = await _minted(accounts, "tok-sealed")
    stored = await _plaintext(accounts, "tok-sealed")
    assert stored is not None and stored.startswith("v1.") and key not in stored and key[3:13] not in stored
    # Bound to its checkout: moved to another row it does not open; another secret does not open it either.
    await accounts.store_checkout_key("tok-other", str(uuid.uuid4()), "tb_placeholder_value")
    await accounts.pool.execute("UPDATE checkout_keys SET api_key = $2 WHERE checkout_token = $1", "tok-other", stored)
    moved = await accounts.take_checkout_key("tok-other", max_age_s=DAY)
    assert moved is not None and moved["api_key"] is None
    rotated = AccountRepository(accounts.pool, sealer=CheckoutKeySealer("another-secret-entirely-0123456789"))
    assert (await rotated.take_checkout_key("tok-sealed", max_age_s=DAY))["api_key"] is None
    assert await _plaintext(accounts, "tok-sealed") is None


async def test_a_key_on_another_account_than_the_paid_one_is_not_handed_out(accounts: AccountRepository) -> None:
    key = await _minted(accounts, "tok-acct")
    row = await accounts.pool.fetchrow("SELECT account_id FROM checkout_keys WHERE checkout_token = 'tok-acct'")
    assert await accounts.take_checkout_key("tok-acct", max_age_s=DAY, account_id=str(uuid.uuid4())) is None
    taken = await accounts.take_checkout_key("tok-acct", max_age_s=DAY, account_id=str(row["account_id"]))
    assert taken is not None and taken["api_key"] == key


async def test_an_old_key_is_erased_unread(accounts: AccountRepository) -> None:
    await _minted(accounts, "tok-old", age_s=DAY + 60)
    taken = await accounts.take_checkout_key("tok-old", max_age_s=DAY)
    # Nothing shown, and shown_at stays empty: the route tells "expired" from "already shown" by it.
    assert taken is not None and taken["api_key"] is None and taken["shown_at"] is None
    assert await _plaintext(accounts, "tok-old") is None
    again = await accounts.take_checkout_key("tok-old", max_age_s=DAY)
    assert again is not None and again["api_key"] is None and again["shown_at"] is None


async def test_concurrent_reads_hand_the_key_to_one_reader(accounts: AccountRepository) -> None:
    key = await _minted(accounts, "tok-race")
    taken = await asyncio.gather(*(accounts.take_checkout_key("tok-race", max_age_s=DAY) for _ in range(4)))
    assert [t["api_key"] for t in taken if t and t["api_key"]] == [key]
    assert all(t is not None and t["shown_at"] is not None for t in taken)


async def test_the_sweep_erases_only_uncollected_old_keys(accounts: AccountRepository) -> None:
    fresh = await _minted(accounts, "tok-fresh", age_s=60)
    await _minted(accounts, "tok-old-a", age_s=DAY + 1)
    await _minted(accounts, "tok-old-b", age_s=3 * DAY)
    assert await handlers.sweep_checkout_keys(accounts=accounts, max_age_s=DAY) == 2
    assert await handlers.sweep_checkout_keys(accounts=accounts, max_age_s=DAY) == 0
    assert await _plaintext(accounts, "tok-old-a") is None
    assert await _plaintext(accounts, "tok-old-b") is None
    # The rows stay, so a redelivered provisioning request does not mint a second key for the checkout.
    assert await accounts.checkout_key_stored("tok-old-a")
    taken = await accounts.take_checkout_key("tok-fresh", max_age_s=DAY)
    assert taken is not None and taken["api_key"] == fresh


async def test_the_gateway_sweeps_periodically(accounts: AccountRepository) -> None:
    settings = GatewaySettings(checkout_key_ttl_s=DAY, gateway_sweep_interval_s=0.05)
    ctx = GatewayContext(settings=settings, bus=None, pool=accounts.pool,  # type: ignore[arg-type]
                         accounts=accounts, backends=BackendRegistry(grace=settings.heartbeat_grace), extras={})
    service = GatewayService(ctx)
    sweeper = asyncio.create_task(service._sweep_forever())
    try:
        # Minted after the loop's first pass: only a later pass can erase it.
        await asyncio.sleep(0.1)
        await _minted(accounts, "tok-late", age_s=DAY + 1)
        deadline = asyncio.get_running_loop().time() + 5
        while await _plaintext(accounts, "tok-late") is not None:
            assert asyncio.get_running_loop().time() < deadline, "the sweep never erased the key"
            await asyncio.sleep(0.05)
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
