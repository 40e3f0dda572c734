"""Least privilege for a Timbre deployment: one PostgreSQL role per service schema, one RabbitMQ user per service.

    python deploy/provision.py db  --admin-url postgresql://postgres:...@db:5432/timbre
    python deploy/provision.py bus --management-url http://rabbitmq:15672 --admin-user admin --vhost / \\
                                   --amqp-url amqp://admin:...@rabbitmq:5672/ --namespace timbre

Passwords come from the environment: <SERVICE>_DB_PASSWORD (gateway, voices, dispatcher, storage, billing) and
<SERVICE>_BUS_PASSWORD (the same and gpu_worker); the admin password from ADMIN_DB_URL / RABBITMQ_ADMIN_PASSWORD
or the arguments. Both commands are idempotent: run them on every deploy (the bus one also declares the whole
topology, which the services' own users may not). The GPU worker gets no database role at all. Each service then
connects with its own URL, e.g. DATABASE_URL=postgresql://timbre_billing:...@db:5432/timbre and
AMQP_URL=amqp://timbre_billing:...@rabbitmq:5672/.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import sys
import urllib.parse
import urllib.request

# service -> its schema. The GPU worker is absent on purpose: it has no database access.
SCHEMAS: dict[str, str] = {"gateway": "gateway", "voices": "voices", "dispatcher": "dispatch",
                           "storage": "storage", "billing": "billing"}
# Services on the bus (their `Bus(service=...)` name, which names their queues and RPC queue).
BUS_SERVICES: tuple[str, ...] = ("gateway", "voices", "dispatcher", "storage", "billing", "gpu_worker")
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


def role_name(service: str, prefix: str = "timbre") -> str:
    """The database role (and broker user) of a service."""
    name = f"{prefix}_{service}"
    if not _NAME.match(name):
        raise ValueError(f"bad role name {name!r}")
    return name


# PostgreSQL ---------------------------------------------------------------------------------------------------
async def provision_db(admin_url: str, passwords: dict[str, str], *, prefix: str = "timbre") -> list[str]:
    """Create (or update) one login role per service that owns its schema and nothing else; returns the roles.

    PUBLIC loses CREATE on the database and on schema `public`, so no role can make a schema or a table outside
    its own; every existing object in a schema is handed to its role (a deployment that ran with one user)."""
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    roles = []
    try:
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'REVOKE CREATE, TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
        await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        for service, schema in SCHEMAS.items():
            role = role_name(service, prefix)
            password = passwords[service]
            quoted = await conn.fetchval("SELECT quote_literal($1)", password)
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            verb = "ALTER" if exists else "CREATE"
            await conn.execute(f'{verb} ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {quoted}')
            await conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO "{role}"')
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}" AUTHORIZATION "{role}"')
            await conn.execute(f'ALTER SCHEMA "{schema}" OWNER TO "{role}"')
            await conn.execute(f'REVOKE ALL ON SCHEMA "{schema}" FROM PUBLIC')
            # Tables made before the roles existed (one shared user) now belong to the schema's role.
            await conn.execute(f"""
                DO $$
                DECLARE r record;
                BEGIN
                    FOR r IN SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = '{schema}' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
                    LOOP
                        EXECUTE format('ALTER %s "{schema}".%I OWNER TO "{role}"',
                                       CASE r.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                                       WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
                                       ELSE 'TABLE' END, r.relname);
                    END LOOP;
                END $$""")
            roles.append(role)
    finally:
        await conn.close()
    return roles


# RabbitMQ -----------------------------------------------------------------------------------------------------
def bus_permissions(namespace: str, service: str) -> dict[str, str]:
    """RabbitMQ configure/write/read patterns of one service under `namespace`.

    configure: its own queues (`<ns>.<service>.*`: consumer queue, DLQ, retry tiers), its RPC queue, and the
    server-named queues of live subscriptions (`amq.gen-*`). write: those, plus the events, retry and dead-letter
    exchanges and the default exchange (RPC requests and replies). read: its queues and the exchanges it binds
    them to. So a service can neither consume nor purge nor delete another service's queue."""
    ns, svc = re.escape(namespace), re.escape(service)
    own = rf"{ns}\.({svc}\..*|rpc\.{svc})"
    exchanges = rf"{ns}\.(events|retry|dlx)"
    return {
        "configure": rf"^({own}|amq\.gen-.*)$",
        "write": rf"^({own}|{exchanges}|amq\.default|amq\.gen-.*)$",
        "read": rf"^({own}|{exchanges}|amq\.gen-.*)$",
    }


def _management(url: str, user: str, password: str, method: str, path: str, body: dict[str, str]) -> None:
    request = urllib.request.Request(f"{url.rstrip('/')}{path}", method=method, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - an operator-given URL
        if response.status // 100 != 2:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}")


def provision_bus_users(management_url: str, admin_user: str, admin_password: str, vhost: str, namespace: str,
                        passwords: dict[str, str], *, prefix: str = "timbre") -> list[str]:
    """Create (or update) one broker user per service with `bus_permissions`, through the management API."""
    users = []
    quoted_vhost = urllib.parse.quote(vhost, safe="")
    for service in BUS_SERVICES:
        user = role_name(service, prefix)
        _management(management_url, admin_user, admin_password, "PUT", f"/api/users/{user}",
                    {"password": passwords[service], "tags": ""})
        _management(management_url, admin_user, admin_password, "PUT",
                    f"/api/permissions/{quoted_vhost}/{user}", bus_permissions(namespace, service))
        users.append(user)
    return users


def all_queue_specs(modal_backends: list[str]) -> list:  # type: ignore[type-arg]
    """Every queue a deployment may use: the service queues, the local work and voice-profile queues of every
    known backend, and the Modal executor's queue."""
    from timbre_common.catalogue import KNOWN_BACKENDS
    from timbre_common.messaging import QUEUES, local_work_queue, modal_executor_queue, voice_profile_queue

    specs = [*QUEUES.values()]
    for backend in KNOWN_BACKENDS:
        specs += [local_work_queue(backend), voice_profile_queue(backend)]
    if modal_backends:
        specs.append(modal_executor_queue(modal_backends))
    return specs


async def declare_all(amqp_url: str, namespace: str, modal_backends: list[str]) -> None:
    """Declare the whole topology with a user allowed to (the services' own users only declare their queues)."""
    import aio_pika

    from timbre_common.messaging import Names, declare_topology

    connection = await aio_pika.connect(amqp_url)
    try:
        await declare_topology(await connection.channel(), Names(namespace), all_queue_specs(modal_backends))
    finally:
        await connection.close()


def _passwords(kind: str, services: tuple[str, ...] | list[str]) -> dict[str, str]:
    missing = [f"{s.upper()}_{kind}_PASSWORD" for s in services if not os.environ.get(f"{s.upper()}_{kind}_PASSWORD")]
    if missing:
        raise SystemExit(f"set {', '.join(missing)}")
    return {s: os.environ[f"{s.upper()}_{kind}_PASSWORD"] for s in services}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    db = sub.add_parser("db", help="one PostgreSQL role per schema")
    db.add_argument("--admin-url", default=os.environ.get("ADMIN_DB_URL"))
    bus = sub.add_parser("bus", help="one RabbitMQ user per service, and the whole topology")
    bus.add_argument("--management-url", default=os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672"))
    bus.add_argument("--admin-user", default=os.environ.get("RABBITMQ_ADMIN_USER", "guest"))
    bus.add_argument("--admin-password", default=os.environ.get("RABBITMQ_ADMIN_PASSWORD", ""))
    bus.add_argument("--amqp-url", default=os.environ.get("ADMIN_AMQP_URL"))
    bus.add_argument("--vhost", default=os.environ.get("RABBITMQ_VHOST", "/"))
    bus.add_argument("--namespace", default=os.environ.get("BUS_NAMESPACE", "timbre"))
    bus.add_argument("--modal-backends", default=os.environ.get("MODAL_BACKENDS", "qwen3-1.7b,qwen3-0.6b"))
    args = parser.parse_args(argv)
    if args.what == "db":
        if not args.admin_url:
            raise SystemExit("set --admin-url or ADMIN_DB_URL")
        roles = asyncio.run(provision_db(args.admin_url, _passwords("DB", list(SCHEMAS))))
        print(json.dumps({"roles": roles}))
    else:
        if not args.amqp_url:
            raise SystemExit("set --amqp-url or ADMIN_AMQP_URL (a broker user allowed to declare the topology)")
        users = provision_bus_users(args.management_url, args.admin_user, args.admin_password, args.vhost,
                                    args.namespace, _passwords("BUS", BUS_SERVICES))
        modal = [b.strip() for b in args.modal_backends.split(",") if b.strip()]
        asyncio.run(declare_all(args.amqp_url, args.namespace, modal))
        print(json.dumps({"users": users}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
