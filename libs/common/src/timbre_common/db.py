"""PostgreSQL: a pool bound to one service schema, and ordered, once-only SQL migrations."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import asyncpg

from .logging import get_logger

log = get_logger(__name__)

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_MIGRATION_RE = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")


def _checked_schema(schema: str) -> str:
    if not _SCHEMA_RE.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return schema


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, *, schema: str, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections see `schema` first on the search path (created if absent)."""
    schema = _checked_schema(schema)
    conn = await asyncpg.connect(dsn)
    try:
        # Only when missing: a role provisioned to own its schema alone may not create schemas, and PostgreSQL
        # checks that right before it looks whether the schema exists.
        if not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    except asyncpg.UniqueViolationError:  # two services starting at once may race on the catalog
        pass
    finally:
        await conn.close()
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        server_settings={"search_path": f"{schema},public"},
    )


async def migrate(pool: asyncpg.Pool, schema: str, migrations_dir: Path) -> list[str]:
    """Apply `NNN_name.sql` files of `migrations_dir` in order, each once; returns those applied now."""
    schema = _checked_schema(schema)
    files = sorted(p for p in Path(migrations_dir).iterdir() if _MIGRATION_RE.match(p.name))
    applied_now: list[str] = []
    lock_id = int.from_bytes(hashlib.sha256(f"migrate:{schema}".encode()).digest()[:8], "big", signed=True)
    async with pool.acquire() as conn:
        # An advisory lock: replicas starting together apply each file exactly once.
        await conn.execute("SELECT pg_advisory_lock($1)", lock_id)
        try:
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations '
                "(name text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            rows = await conn.fetch(f'SELECT name, checksum FROM "{schema}".schema_migrations')
            done = {r["name"]: r["checksum"] for r in rows}
            for path in files:
                sql = path.read_text()
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if path.name in done:
                    if done[path.name] != checksum:
                        log.warning("migration_changed_after_apply", schema=schema, migration=path.name)
                    continue
                async with conn.transaction():
                    await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
                    await conn.execute(sql)
                    await conn.execute(f'INSERT INTO "{schema}".schema_migrations (name, checksum) VALUES ($1, $2)',
                                       path.name, checksum)
                applied_now.append(path.name)
                log.info("migration_applied", schema=schema, migration=path.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", lock_id)
    return applied_now


async def drop_schema(dsn: str, schema: str) -> None:
    """Remove a schema and everything in it (tests and account-less teardown)."""
    schema = _checked_schema(schema)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
