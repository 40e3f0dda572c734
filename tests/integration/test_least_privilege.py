"""Least privilege on the real PostgreSQL and RabbitMQ: deploy/provision.py gives each service a database role
that owns its schema and reaches nothing else, and a broker user that consumes, binds and declares its own queues
only, while the services still migrate, publish, consume and answer RPC with them."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote, urlparse, urlunparse

import aio_pika
import aiormq
import asyncpg
import pytest

from timbre_common.contracts.synthesis import JobOwner, LookupJob
from timbre_common.contracts.voices import VoiceDeleted
from timbre_common.db import create_pool, migrate
from timbre_common.messaging import QUEUES, Bus
from timbre_common.testing import load_module

ROOT = Path(__file__).resolve().parents[2]
provision = load_module("timbre_deploy_provision", ROOT / "deploy/provision.py")
MIGRATIONS = {"gateway": ROOT / "services/gateway/migrations", "billing": ROOT / "services/billing/migrations"}


def _with(url: str, *, user: str | None = None, password: str | None = None, path: str | None = None) -> str:
    parsed = urlparse(url)
    netloc = parsed.netloc.rsplit("@", 1)[-1]
    if user:
        netloc = f"{quote(user)}:{quote(password or '')}@{netloc}"
    return urlunparse(parsed._replace(netloc=netloc, path=path if path is not None else parsed.path))


async def test_each_service_role_owns_its_schema_and_reaches_no_other(database_url: str) -> None:
    prefix = f"lp{uuid.uuid4().hex[:8]}"
    dbname = f"{prefix}_db"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    admin_db = _with(database_url, path=f"/{dbname}")
    passwords = {s: f"pw-{uuid.uuid4().hex}" for s in provision.SCHEMAS}
    pools: list[asyncpg.Pool] = []
    try:
        roles = await provision.provision_db(admin_db, passwords, prefix=prefix)
        assert roles == [f"{prefix}_{s}" for s in provision.SCHEMAS]
        assert "gpu_worker" not in provision.SCHEMAS  # the GPU worker gets no database role at all
        # Idempotent: a second run (every deploy) changes nothing and fails on nothing.
        await provision.provision_db(admin_db, passwords, prefix=prefix)

        as_role = {s: _with(admin_db, user=f"{prefix}_{s}", password=passwords[s]) for s in MIGRATIONS}
        # Each service starts as usual with its own role: pool, schema, migrations.
        for service, migrations in MIGRATIONS.items():
            pool = await create_pool(as_role[service], schema=provision.SCHEMAS[service], min_size=1, max_size=2)
            pools.append(pool)
            assert await migrate(pool, provision.SCHEMAS[service], migrations)
        gateway = await asyncpg.connect(as_role["gateway"])
        try:
            for statement in ("SELECT * FROM billing.customers", "INSERT INTO billing.usage_ledger VALUES "
                              "('j', 'a', 1, now(), now(), now())", "DROP TABLE billing.customers",
                              "CREATE SCHEMA sneaky", "CREATE TABLE public.sneaky (x int)"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await gateway.execute(statement)
            assert await gateway.fetchval("SELECT count(*) FROM gateway.accounts") == 0
        finally:
            await gateway.close()
    finally:
        for pool in pools:
            await pool.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        for service in provision.SCHEMAS:
            await admin.execute(f'DROP ROLE IF EXISTS "{prefix}_{service}"')
        await admin.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def broker_vhost(amqp_url: str):  # type: ignore[no-untyped-def]
    """A vhost of its own on the real broker, with per-service users made by the operator tool."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to create broker users for this test (the broker's own CLI)")
    vhost = f"lp-{uuid.uuid4().hex[:8]}"
    admin = urlparse(amqp_url).username or "guest"
    _rabbitmqctl("add_vhost", vhost)
    users = []
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, admin, ".*", ".*", ".*")
        yield vhost, users
    finally:
        _rabbitmqctl("delete_vhost", vhost)
        for user in users:
            _rabbitmqctl("delete_user", user)


async def test_each_service_user_reaches_its_own_queues_only(amqp_url: str, broker_vhost) -> None:  # type: ignore[no-untyped-def]
    vhost, users = broker_vhost
    namespace = "timbre"
    admin_url = _with(amqp_url, path=f"/{quote(vhost, safe='')}")
    await provision.declare_all(admin_url, namespace, ["qwen3-0.6b"])
    urls = {}
    for service in ("voices", "gateway", "billing"):
        user = f"{vhost}-{service}"
        password = uuid.uuid4().hex
        _rabbitmqctl("add_user", user, password)
        users.append(user)
        perms = provision.bus_permissions(namespace, service)
        _rabbitmqctl("set_permissions", "-p", vhost, user, perms["configure"], perms["write"], perms["read"])
        urls[service] = _with(admin_url, user=user, password=password)

    voices = await Bus(url=urls["voices"], namespace=namespace, service="voices", rpc_timeout=10).connect()
    gateway = await Bus(url=urls["gateway"], namespace=namespace, service="gateway", rpc_timeout=10).connect()
    try:
        # Its own work: consume its queue, answer its RPC queue, publish events.
        got: asyncio.Queue[VoiceDeleted] = asyncio.Queue()

        async def on_deleted(event: VoiceDeleted, **_: object) -> None:
            await got.put(event)

        # With one binding more than the provisioned queue has: the consumer binds its own queue itself.
        spec = replace(QUEUES["voices.events"], bindings=(VoiceDeleted.routing_key(),))
        await voices.consume(spec, {VoiceDeleted: on_deleted})

        async def lookup(cmd: LookupJob, **_: object) -> JobOwner:
            from datetime import UTC, datetime
            return JobOwner(job_id=cmd.job_id, account_id="a", voice_id="v", backend="b", status="pending",
                            created_at=datetime.now(UTC))

        await voices.serve({LookupJob: lookup})
        await gateway.publish(VoiceDeleted(voice_id="v1", account_id="a1"))
        assert (await asyncio.wait_for(got.get(), 10)).voice_id == "v1"
        owner, _ = await gateway.call("voices", LookupJob(job_id="j1"), expect=JobOwner)
        assert owner.job_id == "j1"

        # Another service's queue: not consumed, not purged, not deleted, not bound to anything.
        connection = await aio_pika.connect(urls["voices"])
        try:
            for attempt in ("consume", "purge", "delete", "bind"):
                channel = await connection.channel()
                queue = await channel.get_queue(f"{namespace}.billing.events", ensure=True)
                with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                    if attempt == "consume":
                        await queue.consume(lambda m: None)
                    elif attempt == "purge":
                        await queue.purge()
                    elif attempt == "delete":
                        await queue.delete(if_unused=False, if_empty=False)
                    else:
                        await queue.bind(f"{namespace}.events", routing_key="#")
        finally:
            await connection.close()
    finally:
        await gateway.close()
        await voices.close()
