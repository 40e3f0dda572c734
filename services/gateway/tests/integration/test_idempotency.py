"""IdempotencyStore against a real PostgreSQL schema with the gateway's migrations."""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from types import SimpleNamespace

import pytest
from starlette.responses import JSONResponse, Response

from timbre_common.db import create_pool, migrate
from timbre_gateway.adapters.idempotency import IdempotencyStore, StoredResponse
from timbre_gateway.adapters.repository import AccountRepository
from timbre_gateway.bootstrap import MIGRATIONS
from timbre_gateway.http.errors import ApiError
from timbre_gateway.http.idempotency import ReplayRef, about, idempotent


@pytest.fixture
async def store(database_url: str, pg_schema: str):
    pool = await create_pool(database_url, schema=pg_schema)
    await migrate(pool, pg_schema, MIGRATIONS)
    yield IdempotencyStore(pool)
    await pool.close()


ANSWER = StoredResponse(201, [("content-type", "application/json"), ("x-voice-id", "v1")], b'{"voice_id":"v1"}')


async def test_first_claim_runs_then_a_retry_replays(store):
    account = str(uuid.uuid4())
    first = await store.begin(account, "k1", "fp", ttl_s=60, lease_s=30)
    assert first.outcome == "started"
    assert (await store.begin(account, "k1", "fp", ttl_s=60, lease_s=30)).outcome == "in_progress"
    assert await store.complete(account, "k1", ANSWER, lease=first.lease)
    claim = await store.begin(account, "k1", "fp", ttl_s=60, lease_s=30)
    assert claim.outcome == "replay" and claim.stored == ANSWER


async def test_same_key_other_request_is_a_mismatch(store):
    account = str(uuid.uuid4())
    first = await store.begin(account, "k1", "fp-a", ttl_s=60, lease_s=30)
    assert (await store.begin(account, "k1", "fp-b", ttl_s=60, lease_s=30)).outcome == "mismatch"
    await store.complete(account, "k1", ANSWER, lease=first.lease)
    assert (await store.begin(account, "k1", "fp-b", ttl_s=60, lease_s=30)).outcome == "mismatch"


async def test_keys_are_scoped_per_account(store):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert (await store.begin(a, "shared", "fp-a", ttl_s=60, lease_s=30)).outcome == "started"
    assert (await store.begin(b, "shared", "fp-b", ttl_s=60, lease_s=30)).outcome == "started"


async def test_abandoned_attempt_frees_the_key(store):
    account = str(uuid.uuid4())
    first = await store.begin(account, "k", "fp", ttl_s=60, lease_s=30)
    await store.abandon(account, "k", lease=first.lease)
    assert (await store.begin(account, "k", "fp", ttl_s=60, lease_s=30)).outcome == "started"


async def test_expired_entry_is_forgotten(store):
    account = str(uuid.uuid4())
    first = await store.begin(account, "k", "fp-a", ttl_s=0.2, lease_s=30)
    await store.complete(account, "k", ANSWER, lease=first.lease)
    await asyncio.sleep(0.3)
    # Once expired the key is free even for another request.
    assert (await store.begin(account, "k", "fp-b", ttl_s=60, lease_s=30)).outcome == "started"


async def test_a_crashed_first_attempt_is_taken_over_after_its_lock(store):
    account = str(uuid.uuid4())
    crashed = await store.begin(account, "k", "fp", ttl_s=60, lease_s=0.2)
    assert (await store.begin(account, "k", "fp", ttl_s=60, lease_s=0.2)).outcome == "in_progress"
    await asyncio.sleep(0.3)
    retry = await store.begin(account, "k", "fp", ttl_s=60, lease_s=30)
    assert retry.outcome == "started"
    # The crashed request's replica, should it come back, can neither renew, complete nor free the key.
    assert not await store.renew(account, "k", crashed.lease, lease_s=30)
    assert not await store.complete(account, "k", ANSWER, lease=crashed.lease)
    await store.abandon(account, "k", lease=crashed.lease)
    assert (await store.begin(account, "k", "fp", ttl_s=60, lease_s=30)).outcome == "in_progress"


async def test_concurrent_claims_start_exactly_once(store):
    account = str(uuid.uuid4())
    claims = await asyncio.gather(*[store.begin(account, "race", "fp", ttl_s=60, lease_s=30) for _ in range(8)])
    assert sorted(c.outcome for c in claims) == ["in_progress"] * 7 + ["started"]


# The HTTP side: leases renewed while a request runs, audio kept as a reference, records forgotten ------------

def _ctx(store: IdempotencyStore, lease_s: float) -> SimpleNamespace:
    return SimpleNamespace(idempotency=store, settings=SimpleNamespace(idempotency_lease=lease_s,
                                                                       idempotency_ttl_s=3600))


async def test_a_running_request_keeps_its_key_and_a_crashed_one_frees_it_within_its_lease(store, monkeypatch):
    account, lease_s = str(uuid.uuid4()), 0.6
    ctx = _ctx(store, lease_s)
    started = asyncio.Event()

    async def slow() -> Response:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    first = asyncio.create_task(idempotent(ctx, account_id=account, key="k", request_fingerprint="fp", run=slow))
    await started.wait()
    # Three leases later the request still runs: its renewals keep a retry out.
    await asyncio.sleep(3 * lease_s)
    with pytest.raises(ApiError) as busy:
        await idempotent(ctx, account_id=account, key="k", request_fingerprint="fp", run=slow)
    assert busy.value.code == "idempotency_in_progress"
    # The replica dies: no renewal, and no clean-up either.
    async def dead(*args: object, **kwargs: object) -> None:
        return None

    monkeypatch.setattr(store, "abandon", dead)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await asyncio.sleep(lease_s + 0.3)

    async def answer() -> Response:
        return JSONResponse({"ok": True}, status_code=201)

    served = await idempotent(ctx, account_id=account, key="k", request_fingerprint="fp", run=answer)
    assert served.status_code == 201


async def test_an_audio_answer_is_kept_as_a_reference_and_read_again_on_replay(store):
    account, voice = str(uuid.uuid4()), str(uuid.uuid4())
    job = str(uuid.uuid4())
    ctx = _ctx(store, 30)
    audio = b"ID3" + bytes(2_000_000)

    async def hit() -> Response:
        return about(Response(audio, media_type="audio/mpeg", headers={"X-Job-Id": job, "X-Cache": "HIT"}),
                     ReplayRef(voice_id=voice, job_id=job, audio_format="mp3"))

    first = await idempotent(ctx, account_id=account, key="k", request_fingerprint="fp", run=hit)
    assert first.body == audio
    row = await store.pool.fetchrow(
        "SELECT octet_length(body) AS size, job_id, audio_format FROM idempotency_keys WHERE account_id = $1",
        account)
    assert (row["size"], str(row["job_id"]), row["audio_format"]) == (0, job, "mp3")
    read_again: list[StoredResponse] = []

    async def replay(stored: StoredResponse) -> Response:
        read_again.append(stored)
        return Response(audio, media_type="audio/mpeg")

    again = await idempotent(ctx, account_id=account, key="k", request_fingerprint="fp",
                             run=hit, replay_audio=replay)
    assert again.body == audio and [s.job_id for s in read_again] == [job]
    assert ("x-job-id", job) in read_again[0].headers


async def test_deleting_a_voice_or_purging_the_account_leaves_nothing_replayable(store):
    account, voice, other_voice = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    for key, about_voice in (("a", voice), ("b", other_voice)):
        claim = await store.begin(account, key, "fp", ttl_s=60, lease_s=30)
        await store.complete(account, key, StoredResponse(201, [], b"{}", voice_id=about_voice), lease=claim.lease)
    assert await store.forget_voice(account, voice) == 1
    assert (await store.begin(account, "a", "fp", ttl_s=60, lease_s=30)).outcome == "started"
    assert (await store.begin(account, "b", "fp", ttl_s=60, lease_s=30)).outcome == "replay"
    await AccountRepository(store.pool).delete_account(account)
    assert (await store.begin(account, "b", "fp", ttl_s=60, lease_s=30)).outcome == "started"
