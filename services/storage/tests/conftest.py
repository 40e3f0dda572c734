"""Fixtures: a fresh PostgreSQL schema per test, and both bucket backends (fs dir, S3 over moto server)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from timbre_common.db import create_pool, migrate
from timbre_storage.adapters.blob import BlobStore, FsBlobStore, S3BlobStore
from timbre_storage.adapters.repository import MIGRATIONS_DIR, ObjectRepository

DATABASE_URL = os.environ.get("TIMBRE_TEST_DATABASE_URL") or os.environ.get(
    "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
S3_KEY_ID = "test-access-key"
S3_SECRET = "test-secret-key"
SIGNING_KEY = b"test-signing-key-0123456789abcdef0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on loopback for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
async def s3_store(s3_endpoint: str) -> AsyncIterator[S3BlobStore]:
    """An open S3BlobStore on a fresh bucket."""
    store = S3BlobStore(
        bucket=f"timbre-test-{uuid.uuid4().hex[:12]}",
        endpoint_url=s3_endpoint,
        region="us-east-1",
        access_key_id=S3_KEY_ID,
        secret_access_key=S3_SECRET,
    )
    await store.open()
    await store.client.create_bucket(Bucket=store.bucket)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def fs_store(tmp_path: Path) -> FsBlobStore:
    """An FsBlobStore in a temp dir."""
    return FsBlobStore(tmp_path / "blobs", "http://storage.test", SIGNING_KEY)


@pytest.fixture(params=["fs", "s3"])
def store(request: pytest.FixtureRequest) -> BlobStore:
    """Each storage test runs once per backend."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh schema migrated the way the service does it, dropped afterwards."""
    schema = f"storage_test_{uuid.uuid4().hex[:12]}"
    pool = await create_pool(DATABASE_URL, schema=schema, min_size=1, max_size=4)
    try:
        await migrate(pool, schema, MIGRATIONS_DIR)
        yield pool
    finally:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await pool.close()


@pytest.fixture
def repo(pool: asyncpg.Pool) -> ObjectRepository:
    """The object index on the per-test schema."""
    return ObjectRepository(pool)
