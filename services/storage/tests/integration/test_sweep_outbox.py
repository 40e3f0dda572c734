"""The expiry sweep and its objects.expired commit together (the outbox), against real PostgreSQL: a crash
after the commit still announces the deletion, and a failed sweep announces nothing."""
from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from timbre_common.contracts import utcnow
from timbre_common.contracts.storage import ObjectsExpired
from timbre_common.messaging import OutboxBus, TransactionalPool
from timbre_storage import bus_adapters, handlers
from timbre_storage.adapters.blob import FsBlobStore
from timbre_storage.adapters.repository import ObjectRepository


class Broker:
    """What the relay hands events to (the broker's side of a publish with confirm)."""

    def __init__(self) -> None:
        self.events: list[tuple[object, str | None]] = []

    async def publish(self, event, *, message_id=None, **_):  # type: ignore[no-untyped-def]
        self.events.append((event, message_id))
        return message_id


class BrokenDeletes(FsBlobStore):
    async def delete(self, key: str) -> None:
        raise OSError("bucket unreachable")


async def _expired(repo: ObjectRepository, store: FsBlobStore, n: int) -> list[str]:
    past = utcnow() - timedelta(days=8)
    objs = [await handlers.store_generated_audio(job_id=f"j{i}", account_id="acc", created_at=past, wav=b"W",
                                                 repo=repo, store=store, now=past) for i in range(n)]
    return sorted(o.key for o in objs)


@pytest.fixture
def tpool(pool: asyncpg.Pool) -> TransactionalPool:
    return TransactionalPool(pool)


async def test_a_crash_after_the_sweep_commits_still_announces_every_deleted_object(tpool, fs_store):
    repo = ObjectRepository(tpool)
    keys = await _expired(repo, fs_store, 3)
    broker = Broker()
    outbox = OutboxBus(broker, tpool)
    await outbox.ensure()
    assert await bus_adapters.sweep(repo=repo, store=fs_store, bus=outbox, batch=2) == 3
    # The process dies here: nothing was relayed, yet the rows are gone and the events are committed.
    assert broker.events == [] and await outbox.pending() == 2
    assert [await repo.get(k) for k in keys] == [None] * len(keys)
    restarted = OutboxBus(broker, tpool)
    assert await restarted.relay_once() == 2
    announced = sorted(k for event, _ in broker.events for k in event.keys)  # type: ignore[attr-defined]
    assert announced == keys and all(isinstance(e, ObjectsExpired) for e, _ in broker.events)
    assert await outbox.pending() == 0


async def test_a_sweep_that_fails_half_way_deletes_and_announces_nothing(tpool, fs_store):
    repo = ObjectRepository(tpool)
    keys = await _expired(repo, fs_store, 2)
    broken = BrokenDeletes(fs_store.root, "http://storage.test", b"k" * 32)
    outbox = OutboxBus(Broker(), tpool)
    await outbox.ensure()
    with pytest.raises(OSError):
        await bus_adapters.sweep(repo=repo, store=broken, bus=outbox, batch=10)
    assert await outbox.pending() == 0
    assert None not in [await repo.get(k) for k in keys]
