"""IdempotencyStore against a real PostgreSQL schema with the gateway's migrations."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from timbre_common.db import create_pool, migrate
from timbre_gateway.adapters.idempotency import IdempotencyStore, StoredResponse
from timbre_gateway.bootstrap import MIGRATIONS


@pytest.fixture
async def store(database_url: str, pg_schema: str):
    pool = await create_pool(database_url, schema=pg_schema)
    await migrate(pool, pg_schema, MIGRATIONS)
    yield IdempotencyStore(pool)
    await pool.close()


ANSWER = StoredResponse(201, [("content-type", "application/json"), ("x-voice-id", "v1")], b'{"voice_id":"v1"}')


async def test_first_claim_runs_then_a_retry_replays(store):
    account = str(uuid.uuid4())
    assert (await store.begin(account, "k1", "fp", ttl_s=60)).outcome == "started"
    assert (await store.begin(account, "k1", "fp", ttl_s=60)).outcome == "in_progress"
    await store.complete(account, "k1", ANSWER)
    claim = await store.begin(account, "k1", "fp", ttl_s=60)
    assert claim.outcome == "replay" and claim.stored == ANSWER


async def test_same_key_other_request_is_a_mismatch(store):
    account = str(uuid.uuid4())
    await store.begin(account, "k1", "fp-a", ttl_s=60)
    assert (await store.begin(account, "k1", "fp-b", ttl_s=60)).outcome == "mismatch"
    await store.complete(account, "k1", ANSWER)
    assert (await store.begin(account, "k1", "fp-b", ttl_s=60)).outcome == "mismatch"


async def test_keys_are_scoped_per_account(store):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert (await store.begin(a, "shared", "fp-a", ttl_s=60)).outcome == "started"
    assert (await store.begin(b, "shared", "fp-b", ttl_s=60)).outcome == "started"


async def test_abandoned_attempt_frees_the_key(store):
    account = str(uuid.uuid4())
    await store.begin(account, "k", "fp", ttl_s=60)
    await store.abandon(account, "k")
    assert (await store.begin(account, "k", "fp", ttl_s=60)).outcome == "started"


async def test_expired_entry_is_forgotten(store):
    account = str(uuid.uuid4())
    await store.begin(account, "k", "fp-a", ttl_s=0.2)
    await store.complete(account, "k", ANSWER)
    await asyncio.sleep(0.3)
    # Once expired the key is free even for another request.
    assert (await store.begin(account, "k", "fp-b", ttl_s=60)).outcome == "started"


async def test_a_crashed_first_attempt_is_taken_over_after_its_lock(store):
    account = str(uuid.uuid4())
    await store.begin(account, "k", "fp", ttl_s=60, lock_s=0.2)
    assert (await store.begin(account, "k", "fp", ttl_s=60, lock_s=0.2)).outcome == "in_progress"
    await asyncio.sleep(0.3)
    assert (await store.begin(account, "k", "fp", ttl_s=60, lock_s=0.2)).outcome == "started"


async def test_concurrent_claims_start_exactly_once(store):
    account = str(uuid.uuid4())
    claims = await asyncio.gather(*[store.begin(account, "race", "fp", ttl_s=60) for _ in range(8)])
    assert sorted(c.outcome for c in claims) == ["in_progress"] * 7 + ["started"]
