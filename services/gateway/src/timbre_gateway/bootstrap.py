"""Wiring of the gateway: pool, migrations, bus, event consumers, the HTTP server."""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from timbre_common.contracts.accounts import AccountPurged, AccountPurgeRequested
from timbre_common.contracts.billing import AccountKeysRestored, AccountKeysRevoked, AccountProvisioningRequested
from timbre_common.contracts.synthesis import JobFailed, JobReady, WorkerHeartbeat
from timbre_common.contracts.voices import VoiceDeleted
from timbre_common.contracts.webhooks import WebhookDeliveryDue
from timbre_common.db import create_pool, migrate
from timbre_common.logging import get_logger
from timbre_common.messaging import QUEUES, Bus, OutboxBus, PgDeduper, TransactionalPool, voice_profile_routing_key
from timbre_common.metrics import poll_queues_forever
from timbre_common.redrive import consumer_queues
from timbre_common.runtime import HttpServer

from . import handlers
from .adapters.backends import BackendRegistry
from .adapters.bucket import BucketReader
from .adapters.bucket_factory import bucket_reader
from .adapters.dependencies import DependencyProbe
from .adapters.idempotency import IdempotencyStore
from .adapters.limits import RedisLimiter
from .adapters.read_models import READ_MODEL_EVENTS, ReadModels
from .adapters.repository import AccountRepository
from .adapters.sealing import CheckoutKeySealer
from .adapters.stream_relay import StreamRelay, StreamTimeouts
from .http.app import create_app
from .settings import GatewaySettings
from .webhooks import handlers as webhook_handlers
from .webhooks.domain import parse_schedule
from .webhooks.repository import WebhookRepository
from .webhooks.targets import parse_policy
from .webhooks.transport import BusScheduler, HttpSender

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
log = get_logger(__name__)


@dataclass
class GatewayContext:
    """What route handlers reach through `request.app.state.ctx`."""

    settings: GatewaySettings
    bus: Bus
    pool: Any
    accounts: AccountRepository
    backends: BackendRegistry
    extras: dict[str, Any]
    redis: Any = None
    limiter: RedisLimiter | None = None
    idempotency: IdempotencyStore | None = None
    probe: DependencyProbe | None = None
    # Events that announce a committed change go through the outbox (the purge request, account.purged).
    outbox: OutboxBus | None = None
    webhooks: WebhookRepository | None = None
    # This instance's relay of streamed audio (None in tests that stream nothing).
    streams: StreamRelay | None = None
    # The hot path (http/hot_path.py): read models fed by events, and a read-only reader of the bucket; either
    # None and every answer comes from the services.
    read_models: ReadModels | None = None
    bucket: BucketReader | None = None


class GatewayService:
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.app = create_app(ctx)
        self._server: HttpServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._webhook_scheduler: BusScheduler | None = None
        self._webhook_sender: HttpSender | None = None

    async def start(self) -> None:
        ctx = self.ctx
        deduper = PgDeduper(ctx.pool)
        await deduper.ensure()
        deps = {"accounts": ctx.accounts}
        keys_deps = {**deps, "bus": ctx.outbox or ctx.bus}  # changes to keys are announced (account.keys_changed)
        if ctx.outbox is not None:
            await ctx.outbox.ensure()
            ctx.outbox.start()
        announce_purge = None
        if ctx.webhooks is not None:
            announce_purge = await self._start_webhooks(ctx.webhooks)
        await ctx.bus.consume(QUEUES["gateway.events"], {
            AccountPurgeRequested: partial(handlers.on_purge_requested, bus=ctx.outbox or ctx.bus,
                                           announce_purge=announce_purge, **deps),
            AccountPurged: partial(handlers.on_purged, **deps),
            AccountProvisioningRequested: partial(handlers.on_provisioning_requested, **keys_deps),
            AccountKeysRevoked: partial(handlers.on_keys_revoked, **keys_deps),
            AccountKeysRestored: partial(handlers.on_keys_restored, **keys_deps),
        }, deduper=deduper)
        await ctx.bus.subscribe([WorkerHeartbeat], ctx.backends.on_heartbeat)
        if ctx.read_models is not None:
            # This instance's own fan-out queue: every gateway keeps its own read models.
            await ctx.bus.subscribe(READ_MODEL_EVENTS, ctx.read_models.on_event,
                                    routing_keys=(voice_profile_routing_key("*"),))
            # Events may have been missed while the connection was down: forget what they would have invalidated.
            # No key is kept from the database while nothing would say it was revoked.
            models = ctx.read_models

            def lost(*_: Any) -> None:
                models.keys_enabled = False
                models.clear()

            def back(*_: Any) -> None:
                models.clear()
                models.keys_enabled = True

            for name, callback in (("close_callbacks", lost), ("reconnect_callbacks", back)):
                callbacks = getattr(ctx.bus.connection, name, None)
                if callbacks is not None:
                    callbacks.add(callback)
        if ctx.streams is not None:
            await ctx.streams.start()
        self._tasks.append(asyncio.create_task(self._sweep_forever()))
        # Queue depths, consumers and dead letters for Prometheus: read here, where /metrics is always served.
        self._tasks.append(asyncio.create_task(poll_queues_forever(
            ctx.bus.connection, ctx.bus.names, consumer_queues, ctx.settings.queue_poll_interval_s, log)))
        self._server = HttpServer(self.app, host=ctx.settings.host, port=ctx.settings.port)
        await self._server.start()

    async def _start_webhooks(self, webhooks: WebhookRepository) -> Any:
        """The delivery consumers of client webhooks, in this process: deliveries are I/O-bound awaits, bounded
        per endpoint and in all (the queue's prefetch), each with a timeout, so they never hold up a request."""
        settings = self.ctx.settings
        scheduler = self._webhook_scheduler = BusScheduler(self.ctx.bus)
        await scheduler.start()
        sender = self._webhook_sender = HttpSender(parse_policy(settings.webhook_allow_private),
                                                   timeout_s=settings.webhook_timeout_s,
                                                   **({"resolver": self.ctx.extras["webhook_resolver"]}
                                                      if "webhook_resolver" in self.ctx.extras else {}))
        deps = {"webhooks": webhooks, "scheduler": scheduler}
        await self.ctx.bus.consume(QUEUES["gateway.webhook_events"], {
            JobReady: partial(webhook_handlers.on_job_ready, **deps),
            JobFailed: partial(webhook_handlers.on_job_failed, **deps),
            VoiceDeleted: partial(webhook_handlers.on_voice_deleted, **deps),
        })
        await self.ctx.bus.consume(QUEUES["gateway.webhook_deliveries"], {
            WebhookDeliveryDue: partial(webhook_handlers.on_delivery_due, sender=sender,
                                        slots=webhook_handlers.EndpointSlots(settings.webhook_concurrency_per_endpoint),
                                        schedule=parse_schedule(settings.webhook_retry_schedule_s), **deps),
        })
        return partial(webhook_handlers.announce_purge, **deps)

    async def _sweep_forever(self) -> None:
        """Expire what the gateway keeps for a while (uncollected checkout keys, idempotency records) and ask
        again for account purges some service has not confirmed."""
        settings = self.ctx.settings
        while True:
            try:
                await handlers.sweep_checkout_keys(accounts=self.ctx.accounts,
                                                   max_age_s=settings.checkout_key_ttl_s)
                await handlers.resend_unfinished_purges(accounts=self.ctx.accounts, bus=self.ctx.bus,
                                                        older_than_s=settings.gateway_sweep_interval_s,
                                                        within_s=settings.purge_deadline_s)
                await handlers.fail_overdue_purges(accounts=self.ctx.accounts, deadline_s=settings.purge_deadline_s)
                if self.ctx.webhooks is not None and self._webhook_scheduler is not None:
                    await webhook_handlers.resend_stalled(webhooks=self.ctx.webhooks, scheduler=self._webhook_scheduler,
                                                          overdue_s=max(600.0, settings.gateway_sweep_interval_s))
                if self.ctx.idempotency is not None:
                    purged = await self.ctx.idempotency.purge_expired()
                    if purged:
                        log.info("idempotency_records_expired", records=purged)
            except Exception:
                log.exception("gateway_sweep_failed")
            await asyncio.sleep(settings.gateway_sweep_interval_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.stop()
        if self.ctx.outbox is not None:
            await self.ctx.outbox.stop()
        await self.ctx.bus.close()
        if self.ctx.bucket is not None:
            await self.ctx.bucket.close()
        if self._webhook_sender is not None:
            await self._webhook_sender.close()
        if self.ctx.redis is not None:
            await self.ctx.redis.aclose()
        await self.ctx.pool.close()


async def build_context(settings: GatewaySettings) -> GatewayContext:
    pool = TransactionalPool(await create_pool(settings.database_url.get_secret_value(), schema=settings.db_schema))
    await migrate(pool, settings.db_schema, MIGRATIONS)
    bus = await Bus(url=settings.amqp_url.get_secret_value(), namespace=settings.bus_namespace,
                    service="gateway", rpc_timeout=settings.rpc_timeout_s).connect()
    # Short timeouts: a Redis outage must cost a request milliseconds (limits then hold per process), not seconds.
    redis = aioredis.from_url(settings.redis_url.get_secret_value(), socket_timeout=0.5,
                              socket_connect_timeout=0.5)
    limiter = RedisLimiter(redis, namespace=settings.bus_namespace, lease_ttl_s=settings.concurrency_lease_s)
    secret = settings.checkout_sealing_secret()
    if not secret:
        # Development without ADMIN_SECRET: a key for this process only (a restart forgets uncollected keys).
        log.warning("checkout_keys_sealed_with_a_process_key")
        secret = secrets.token_hex(32)
    accounts = AccountRepository(pool, sealer=CheckoutKeySealer(secret))
    return GatewayContext(settings=settings, bus=bus, pool=pool, accounts=accounts,
                          backends=BackendRegistry(grace=settings.heartbeat_grace), extras={},
                          redis=redis, limiter=limiter, idempotency=IdempotencyStore(pool),
                          probe=DependencyProbe(pool=pool, bus=bus), outbox=OutboxBus(bus, pool),
                          webhooks=WebhookRepository(pool),
                          streams=StreamRelay(bus, timeouts=StreamTimeouts(
                              start_s=settings.stream_start_timeout_s, idle_s=settings.stream_idle_timeout_s,
                              gap_s=settings.stream_gap_timeout_s)),
                          read_models=ReadModels(max_entries=settings.read_model_max_entries,
                                                 key_ttl_s=settings.key_cache_ttl_s)
                          if settings.read_models else None,
                          bucket=bucket_reader(settings) if settings.read_models else None)


async def build(settings: GatewaySettings | None = None) -> GatewayService:
    return GatewayService(await build_context(settings or GatewaySettings()))
