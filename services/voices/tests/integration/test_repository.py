"""VoiceRepository against PostgreSQL (fresh schema per test)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from timbre_common.db import create_pool, migrate
from timbre_voices.adapters.repository import VoiceRepository

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


@pytest.fixture
async def repo(database_url: str, pg_schema: str) -> AsyncIterator[VoiceRepository]:
    pool = await create_pool(database_url, schema=pg_schema)
    await migrate(pool, pg_schema, MIGRATIONS)
    yield VoiceRepository(pool)
    await pool.close()


def ascending_ids(n: int) -> list[str]:
    """Voice ids that sort in the order they are made, so a created_at tie cannot reorder a page."""
    return sorted(str(uuid.uuid4()) for _ in range(n))


async def add(repo: VoiceRepository, *, account: str = "acc1", voice_id: str | None = None,
              name: str = "my voice") -> str:
    voice_id = voice_id or str(uuid.uuid4())
    await repo.add(voice_id=voice_id, account_id=account, name=name, backend="qwen3", lang="en",
                   ref_text="the quick brown fox", family="qwen", reference_key=f"refs/{account}/{voice_id}.wav",
                   quality={"snr_db": 31.5, "warnings": []}, metadata={"source": "upload"})
    return voice_id


def voice_ids(rows: list[asyncpg.Record]) -> list[str]:
    return [str(r["voice_id"]) for r in rows]


async def test_add_returns_the_row(repo: VoiceRepository) -> None:
    voice_id = str(uuid.uuid4())
    row = await repo.add(voice_id=voice_id, account_id="acc1", name="Ada", backend="qwen3", lang="fr",
                         ref_text=None, family=None, reference_key="refs/acc1/x.wav",
                         quality={"snr_db": 20.0}, metadata={"tags": ["a", "b"]})
    assert str(row["voice_id"]) == voice_id and row["account_id"] == "acc1" and row["name"] == "Ada"
    assert row["backend"] == "qwen3" and row["lang"] == "fr" and row["ref_text"] is None and row["family"] is None
    assert row["quality"] == {"snr_db": 20.0} and row["metadata"] == {"tags": ["a", "b"]}
    assert row["profile"] == {} and row["created_at"] is not None


async def test_get_is_scoped_by_account(repo: VoiceRepository) -> None:
    voice_id = await add(repo, account="acc1")
    row = await repo.get("acc1", voice_id)
    assert row is not None and str(row["voice_id"]) == voice_id
    assert row["quality"] == {"snr_db": 31.5, "warnings": []} and row["metadata"] == {"source": "upload"}
    assert await repo.get("acc2", voice_id) is None
    assert await repo.get("acc1", str(uuid.uuid4())) is None


async def test_list_pages_in_creation_order(repo: VoiceRepository) -> None:
    made = [await add(repo, voice_id=v, name=f"v{i}") for i, v in enumerate(ascending_ids(5))]
    await add(repo, account="acc2")
    first = await repo.list("acc1", limit=2)
    assert voice_ids(first) == made[:2]
    second = await repo.list("acc1", limit=2, after=voice_ids(first)[-1])
    assert voice_ids(second) == made[2:4]
    third = await repo.list("acc1", limit=2, after=voice_ids(second)[-1])
    assert voice_ids(third) == made[4:]
    assert await repo.list("acc1", limit=2, after=made[-1]) == []
    assert voice_ids(await repo.list("acc1", limit=100)) == made
    assert len(await repo.list("acc2", limit=100)) == 1


async def test_list_is_stable_when_voices_are_added_between_pages(repo: VoiceRepository) -> None:
    ids = ascending_ids(6)
    made = [await add(repo, voice_id=v) for v in ids[:4]]
    first = await repo.list("acc1", limit=2)
    assert voice_ids(first) == made[:2]
    # Voices added while the client pages (even with ids sorting first) come after, never shift a page.
    early_id = "00000000-0000-4000-8000-000000000000"
    added = [await add(repo, voice_id=early_id), await add(repo, voice_id=ids[5])]
    seen = voice_ids(first)
    after = seen[-1]
    while page := await repo.list("acc1", limit=2, after=after):
        seen += voice_ids(page)
        after = seen[-1]
    assert seen == made + added


async def test_list_after_a_voice_that_is_not_the_accounts_returns_nothing(repo: VoiceRepository) -> None:
    await add(repo, account="acc1")
    await add(repo, account="acc1")
    foreign = await add(repo, account="acc2")
    assert await repo.list("acc1", limit=10, after=foreign) == []
    assert await repo.list("acc1", limit=10, after=str(uuid.uuid4())) == []


async def test_list_after_a_deleted_voice_returns_nothing(repo: VoiceRepository) -> None:
    made = [await add(repo, voice_id=v) for v in ascending_ids(3)]
    await repo.delete("acc1", made[0])
    # The cursor's row is gone, so the keyset has no anchor: an empty page, not a restart from the top.
    assert await repo.list("acc1", limit=10, after=made[0]) == []


async def test_set_profile_merges_per_backend(repo: VoiceRepository) -> None:
    voice_id = await add(repo)
    assert await repo.set_profile(voice_id, "qwen3", {"embedding": [0.1, 0.2], "v": 1}) is True
    assert await repo.set_profile(voice_id, "hibari", {"style": "calm"}) is True
    row = await repo.get("acc1", voice_id)
    assert row["profile"] == {"qwen3": {"embedding": [0.1, 0.2], "v": 1}, "hibari": {"style": "calm"}}
    # A backend's new profile replaces its own entry and leaves the others.
    assert await repo.set_profile(voice_id, "qwen3", {"v": 2}) is True
    row = await repo.get("acc1", voice_id)
    assert row["profile"] == {"qwen3": {"v": 2}, "hibari": {"style": "calm"}}
    # Other columns are untouched.
    assert row["metadata"] == {"source": "upload"} and row["quality"] == {"snr_db": 31.5, "warnings": []}


async def test_set_profile_for_an_unknown_voice_returns_false(repo: VoiceRepository) -> None:
    assert await repo.set_profile(str(uuid.uuid4()), "qwen3", {"v": 1}) is False
    voice_id = await add(repo)
    await repo.delete("acc1", voice_id)
    assert await repo.set_profile(voice_id, "qwen3", {"v": 1}) is False


async def test_delete_returns_the_row_and_is_scoped(repo: VoiceRepository) -> None:
    voice_id = await add(repo, account="acc1", name="gone")
    assert await repo.delete("acc2", voice_id) is None
    assert await repo.get("acc1", voice_id) is not None
    row = await repo.delete("acc1", voice_id)
    assert row is not None and str(row["voice_id"]) == voice_id and row["name"] == "gone"
    assert row["reference_key"] == f"refs/acc1/{voice_id}.wav"
    assert await repo.get("acc1", voice_id) is None
    assert await repo.delete("acc1", voice_id) is None


async def test_delete_account(repo: VoiceRepository) -> None:
    mine = {await add(repo, account="acc1") for _ in range(3)}
    theirs = await add(repo, account="acc2")
    rows = await repo.delete_account("acc1")
    assert set(voice_ids(rows)) == mine
    assert {r["reference_key"] for r in rows} == {f"refs/acc1/{v}.wav" for v in mine}
    assert await repo.list("acc1", limit=10) == []
    assert await repo.get("acc2", theirs) is not None
    assert await repo.delete_account("acc1") == []
