"""A transactional outbox per service: an event is written in the same transaction as the state it announces,
and a relay publishes it (with publisher confirms) once that transaction has committed.

A crash between "state changed" and "event announced" then loses nothing: the event is a row in the service's
`outbox` table until the broker has confirmed it. A crash between the confirm and the row's deletion publishes
it again under the same message id, which consumers drop (their inbox).

Handlers see the same port as before (`publish`, `call`) plus `transaction()`:

    async with bus.transaction():
        failed = await jobs.mark_failed(job_id, ...)      # the repository's queries join this transaction
        if failed:
            await bus.publish(JobFailed(...))             # a row in `outbox`, in this transaction

Repositories join the transaction through `TransactionalPool`, which runs their queries on the open
transaction's connection when there is one (a context variable), and on the pool otherwise.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import Any

from .. import tracing
from ..contracts import Command, Event, new_id, resolve
from ..logging import correlation_id_var, get_logger

log = get_logger(__name__)

_ambient: contextvars.ContextVar[Any | None] = contextvars.ContextVar("timbre_transaction", default=None)


class _Borrowed:
    """`async with pool.acquire()` inside an open transaction: its connection, not a new one."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def __aenter__(self) -> Any:
        return self.conn

    async def __aexit__(self, *_: Any) -> None:
        return None


class TransactionalPool:
    """An asyncpg pool whose queries join the transaction opened by `transaction()` in the same task."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def __getattr__(self, name: str) -> Any:  # close(), get_size() ...: the pool's own
        return getattr(self.pool, name)

    @staticmethod
    def in_transaction() -> bool:
        return _ambient.get() is not None

    def acquire(self) -> Any:
        conn = _ambient.get()
        return _Borrowed(conn) if conn is not None else self.pool.acquire()

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> str:
        conn = _ambient.get()
        return await (conn or self.pool).execute(query, *args, **kwargs)

    async def executemany(self, query: str, args: Any, **kwargs: Any) -> None:
        conn = _ambient.get()
        return await (conn or self.pool).executemany(query, args, **kwargs)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> list[Any]:
        conn = _ambient.get()
        return await (conn or self.pool).fetch(query, *args, **kwargs)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        conn = _ambient.get()
        return await (conn or self.pool).fetchrow(query, *args, **kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        conn = _ambient.get()
        return await (conn or self.pool).fetchval(query, *args, **kwargs)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """One transaction for everything awaited inside (nested blocks become savepoints)."""
        conn = _ambient.get()
        if conn is not None:
            async with conn.transaction():
                yield conn
            return
        async with self.pool.acquire() as conn, conn.transaction():
            token = _ambient.set(conn)
            try:
                yield conn
            finally:
                _ambient.reset(token)


class OutboxBus:
    """The service's MessageBus: events go to the outbox (then the relay), calls go straight to the broker."""

    DDL = ("CREATE TABLE IF NOT EXISTS outbox (id bigserial PRIMARY KEY, message_id text NOT NULL, "
           "type text NOT NULL, version integer NOT NULL, payload jsonb NOT NULL, body bytea, account_id text, "
           "correlation_id text, routing_key text, created_at timestamptz NOT NULL DEFAULT now())")

    def __init__(self, bus: Any, pool: TransactionalPool, *, batch: int = 200, poll_s: float = 1.0) -> None:
        self.bus = bus
        self.pool = pool
        self.batch = batch
        self.poll_s = poll_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def ensure(self) -> None:
        await self.pool.execute(self.DDL)
        # The trace the event was announced in, so the relay's publish continues it (added after the table).
        await self.pool.execute("ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text")

    # The MessageBus port ------------------------------------------------------------------------------
    async def publish(self, event: Event, *, body: bytes | None = None, account_id: str | None = None,
                      message_id: str | None = None, correlation_id: str | None = None,
                      routing_key: str | None = None) -> str:
        """Record `event` for publication: inside `transaction()` it commits (or not) with the state."""
        message_id = message_id or new_id()
        trace: dict[str, Any] = {}
        tracing.inject(trace)
        await self.pool.execute(
            "INSERT INTO outbox (message_id, type, version, payload, body, account_id, correlation_id, routing_key,"
            " traceparent) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            message_id, event.TYPE, event.VERSION, event.model_dump(mode="json"), body,
            account_id or getattr(event, "account_id", None), correlation_id or correlation_id_var.get(),
            routing_key, trace.get("traceparent"))
        if not self.pool.in_transaction():
            self._wake.set()
        return message_id

    async def publish_now(self, event: Event, **kwargs: Any) -> str:
        """Publish straight to the broker with its confirm, past the outbox: for a message whose refusal the
        caller must hear at once (a work order to a full queue) and whose loss a sweep already repairs."""
        return await self.bus.publish(event, **kwargs)

    async def call(self, service: str, command: Command, **kwargs: Any) -> Any:
        return await self.bus.call(service, command, **kwargs)

    async def send(self, queue: str, message: Any, **kwargs: Any) -> None:
        """A message to one queue (a stream's pieces): live data, straight to the broker."""
        await self.bus.send(queue, message, **kwargs)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """State changes and the events published inside commit together; the relay runs right after."""
        outermost = not self.pool.in_transaction()
        async with self.pool.transaction():
            yield
        if outermost:
            self._wake.set()

    # The relay -----------------------------------------------------------------------------------------
    async def relay_once(self) -> int:
        """Publish (with confirms) and delete up to `batch` committed events, oldest first; returns how many.

        Rows are locked while they are published, so replicas relaying the same outbox never send one twice
        at once; anything not confirmed stays for the next round.
        """
        failure: Exception | None = None
        sent: list[int] = []
        async with self.pool.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch("SELECT * FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED", self.batch)
            for row in rows:
                payload = row["payload"]
                payload = json.loads(payload) if isinstance(payload, str) else payload
                found = resolve(row["type"], row["version"], payload)  # an older version's row is upcast
                if found is None:  # written by a newer version of this service: leave it for that one
                    log.error("outbox_type_unknown", type=row["type"], version=row["version"])
                    continue
                cls, payload = found
                event = cls.model_validate(payload)
                traced = row.get("traceparent")
                try:
                    with (tracing.continued("outbox relay", {"traceparent": traced}, kind="internal") if traced
                          else nullcontext()):
                        await self.bus.publish(event, body=row["body"], account_id=row["account_id"],
                                               message_id=row["message_id"], correlation_id=row["correlation_id"],
                                               routing_key=row["routing_key"])
                except Exception as exc:  # what was confirmed is deleted; the rest waits for the next round
                    failure = exc
                    break
                sent.append(row["id"])
            if sent:
                await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", sent)
        if failure is not None:
            raise failure
        return len(sent)

    async def relay_forever(self) -> None:
        """Relay whenever a transaction commits events, and every `poll_s` for what a crash left behind."""
        while True:
            try:
                while await self.relay_once() >= self.batch:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker or database away: the rows wait, nothing is lost
                log.warning("outbox_relay_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
            self._wake.clear()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.relay_forever())

    async def stop(self) -> None:
        """Stop relaying (what is left goes out at the next start, from any replica)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def pending(self) -> int:
        return int(await self.pool.pool.fetchval("SELECT count(*) FROM outbox"))
