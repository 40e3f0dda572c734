"""Fixtures shared by every test: where the real services are, and per-test isolation on them."""
from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlparse

import pytest

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def _require(url: str, port: int, what: str) -> str:
    """The service's URL; a missing service fails the test (CI) rather than skipping it."""
    if not _reachable(url, port):
        pytest.fail(f"{what} is not reachable at {url}: start it (see README, `.ci/run`) or set its URL")
    return url


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return _require(AMQP_URL, 5672, "RabbitMQ")


@pytest.fixture(scope="session")
def database_url() -> str:
    return _require(DATABASE_URL, 5432, "PostgreSQL")


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _require(REDIS_URL, 6379, "Redis")


@pytest.fixture
def bus_namespace() -> str:
    """A namespace of exchanges and queues that no other test shares."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def pg_schema(database_url: str):
    """A fresh schema, dropped after the test."""
    from timbre_common.db import drop_schema

    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema
    await drop_schema(database_url, schema)


@pytest.fixture(autouse=True)
def _structlog_config_restored():
    """A test that configures logging (to a buffer, say) leaves the next test the configuration it found."""
    import structlog

    saved = structlog.get_config()
    yield
    if structlog.get_config() != saved:
        structlog.reset_defaults()
        structlog.configure(**saved)
