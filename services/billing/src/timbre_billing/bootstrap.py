"""Builds billing's dependencies from settings; tests pass overrides through the same function."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import asyncpg

from timbre_common import metrics
from timbre_common.db import create_pool, migrate
from timbre_common.logging import get_logger
from timbre_common.messaging import QUEUES, Bus, OutboxBus, PgDeduper, TransactionalPool

from .adapters.repository import BillingRepository
from .adapters.stripe_gateway import StripeGateway
from .handlers import StripeApi
from .settings import BillingSettings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
SCHEMA = "billing"
log = get_logger(__name__)


@dataclass
class BillingDependencies:
    """What the handlers take by keyword; `stripe` is None with BILLING=off."""

    settings: BillingSettings
    pool: asyncpg.Pool
    repository: BillingRepository
    stripe: StripeApi | None

    async def aclose(self) -> None:
        """Close the Stripe client and the pool."""
        if isinstance(self.stripe, StripeGateway):
            await self.stripe.aclose()
        await self.pool.close()


async def build(
    settings: BillingSettings,
    *,
    pool: asyncpg.Pool | None = None,
    stripe: StripeApi | None = None,
    schema: str = SCHEMA,
) -> BillingDependencies:
    """Pool (migrated), repository and Stripe gateway for billing."""
    if pool is None:
        pool = await create_pool(settings.database_url.get_secret_value(), schema=schema)
    if not isinstance(pool, TransactionalPool):
        pool = TransactionalPool(pool)  # the repository's queries join the outbox's transactions
    await migrate(pool, schema, MIGRATIONS_DIR)
    if stripe is None and settings.enabled:
        stripe = StripeGateway.from_settings(settings)
    return BillingDependencies(settings, pool, BillingRepository(pool), stripe)


class BillingService:
    """The billing process: RPC for the gateway, usage from job.ready, quota holds released on job.failed."""

    def __init__(self, deps: BillingDependencies, bus: Bus) -> None:
        self.deps = deps
        self.broker = bus
        # Handlers publish through the outbox: events commit with the state they announce.
        self.bus = OutboxBus(bus, deps.pool)  # type: ignore[arg-type]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        from timbre_common.contracts import billing as c
        from timbre_common.contracts.accounts import AccountPurgeRequested
        from timbre_common.contracts.synthesis import JobFailed, JobReady

        from . import bus_adapters as a

        d = {"deps": self.deps}
        await self.bus.ensure()
        self.bus.start()
        await self.broker.serve({
            c.CheckQuota: partial(a.check_quota, **d),
            c.ReleaseHold: partial(a.release_hold, **d),
            c.GetUsage: partial(a.get_usage, **d),
            c.StartCheckout: partial(a.start_checkout, **d),
            c.GetCheckoutStatus: partial(a.checkout_status, **d),
            c.HandleStripeWebhook: partial(a.stripe_webhook, bus=self.bus, **d),
        })
        deduper = PgDeduper(self.deps.pool)
        await deduper.ensure()
        await self.broker.consume(QUEUES["billing.events"], {
            JobReady: partial(a.on_job_ready, **d),
            JobFailed: partial(a.on_job_failed, **d),
            AccountPurgeRequested: partial(a.on_account_purge, bus=self.bus, **d),
        }, deduper=deduper)
        self._tasks.append(asyncio.create_task(self._expire_checkouts_forever()))
        self._tasks.append(asyncio.create_task(self._watch_holds()))

    async def _expire_checkouts_forever(self) -> None:
        from . import handlers

        while True:
            try:
                await handlers.expire_checkouts(repository=self.deps.repository, settings=self.deps.settings)
            except Exception:
                log.exception("checkout_sweep_failed")
            await asyncio.sleep(self.deps.settings.checkout_sweep_interval_s)

    async def _watch_holds(self) -> None:
        """Quota holds for /metrics: many, or old ones, mean jobs whose end billing never heard of."""
        while True:
            try:
                holds, oldest_s = await self.deps.repository.hold_stats()
                metrics.QUOTA_HOLDS_ACTIVE.set(holds)
                metrics.QUOTA_HOLD_OLDEST_AGE.set(oldest_s)
            except Exception as exc:  # the next round tries again
                log.warning("hold_stats_failed", error=type(exc).__name__)
            await asyncio.sleep(self.deps.settings.hold_stats_interval_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.stop()
        await self.broker.close()
        await self.deps.aclose()


async def build_service(settings: BillingSettings | None = None) -> BillingService:
    settings = settings or BillingSettings()
    deps = await build(settings)
    bus = await Bus(url=settings.amqp_url.get_secret_value(), namespace=settings.bus_namespace,
                    service="billing", rpc_timeout=settings.rpc_timeout_s).connect()
    return BillingService(deps, bus)
