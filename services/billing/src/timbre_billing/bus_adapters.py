"""The billing service on the bus: commands and events translated to the handlers of `handlers.py`.

Serves (RPC): CheckQuota, ReleaseHold, GetUsage, StartCheckout, GetCheckoutStatus, HandleStripeWebhook.
Consumes: job.ready (usage, once per job; drops the job's quota hold), job.failed (releases the job's quota hold),
account.purge_requested.
Emits: billing.account_provisioning_requested, billing.account_keys_revoked / restored, account.purged.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from timbre_common.contracts import Envelope, utcnow
from timbre_common.contracts import billing as c
from timbre_common.contracts.accounts import AccountPurged, AccountPurgeRequested
from timbre_common.contracts.synthesis import JobFailed, JobReady
from timbre_common.messaging import Invalid, NotFound, RpcError
from timbre_common.ports import MessageBus

from . import handlers
from .adapters.stripe_gateway import StripeUnavailable
from .adapters.webhooks import WebhookRejected
from .bootstrap import BillingDependencies
from .domain import BillingDisabled, InvalidEmail, UnknownCheckoutToken


@asynccontextmanager
async def _domain_errors() -> AsyncIterator[None]:
    try:
        yield
    except BillingDisabled as exc:
        raise NotFound("billing_disabled", "billing is switched off on this deployment") from exc
    except InvalidEmail as exc:
        raise Invalid("invalid_email", str(exc) or "that is not a valid email address") from exc
    except UnknownCheckoutToken as exc:
        raise NotFound("checkout_not_found", "no such checkout") from exc
    except WebhookRejected as exc:
        raise RpcError(exc.code, str(exc) or "webhook rejected", status=400) from exc
    except StripeUnavailable as exc:
        raise RpcError("stripe_unavailable", "Stripe could not be reached; retry", status=503) from exc


async def check_quota(cmd: c.CheckQuota, *, envelope: Envelope, deps: BillingDependencies) -> c.QuotaDecision:
    decision = await handlers.check_quota(cmd.account_id, cmd.characters, repository=deps.repository,
                                          settings=deps.settings, reserve=cmd.reserve)
    reason = None if decision.allowed else decision.reason
    return c.QuotaDecision(allowed=decision.allowed, remaining=decision.remaining, reason=reason,
                           hold_id=decision.hold_id)


async def release_hold(cmd: c.ReleaseHold, *, envelope: Envelope, deps: BillingDependencies) -> None:
    await handlers.release_hold(cmd.account_id, cmd.hold_id, repository=deps.repository)


async def get_usage(cmd: c.GetUsage, *, envelope: Envelope, deps: BillingDependencies) -> c.UsageReport:
    report = await handlers.usage(cmd.account_id, utcnow(), repository=deps.repository, settings=deps.settings)
    return c.UsageReport(account_id=cmd.account_id, period_start=report.period_start, period_end=report.period_end,
                         characters_used=report.characters_used, jobs=report.jobs,
                         quota=report.quota if deps.settings.enabled else None,
                         remaining=report.remaining if deps.settings.enabled else None,
                         billing="on" if deps.settings.enabled else "off")


async def start_checkout(cmd: c.StartCheckout, *, envelope: Envelope, deps: BillingDependencies) -> c.CheckoutStarted:
    async with _domain_errors():
        started = await handlers.start_checkout(cmd.email, repository=deps.repository, stripe=deps.stripe,
                                                settings=deps.settings, account_id=cmd.account_id)
    return c.CheckoutStarted(url=started.url, already_subscribed=started.already_subscribed)


async def checkout_status(cmd: c.GetCheckoutStatus, *, envelope: Envelope,
                          deps: BillingDependencies) -> c.CheckoutStatus:
    """`ready` here means paid: the gateway holds the minted key and shows it once."""
    async with _domain_errors():
        status = await handlers.checkout_status(cmd.token, repository=deps.repository)
    return c.CheckoutStatus(ready=status.paid, account_id=status.account_id, customer_id=status.customer_id,
                            email=status.email)


async def stripe_webhook(cmd: c.HandleStripeWebhook, *, envelope: Envelope, body: bytes, deps: BillingDependencies,
                         bus: MessageBus) -> c.WebhookOutcome:
    """Apply the event once; publish what it asks of the gateway (again on a re-send: consumers dedupe)."""
    async with _domain_errors():
        outcome = await handlers.handle_stripe_webhook(body, cmd.signature, repository=deps.repository,
                                                       stripe=deps.stripe, settings=deps.settings)
    actions: list[dict[str, str]] = []
    if outcome.provision is not None:
        p = outcome.provision
        await bus.publish(c.AccountProvisioningRequested(account_id=p.account_id, customer_id=p.customer_id,
                                                         email=p.email, checkout_token=p.checkout_token),
                          message_id=f"provision:{outcome.event_id}")
        actions.append({"provision": p.account_id})
    if outcome.revoke is not None and outcome.revoke.account_id:
        await bus.publish(c.AccountKeysRevoked(account_id=outcome.revoke.account_id, reason=outcome.revoke.reason),
                          message_id=f"revoke:{outcome.event_id}")
        actions.append({"revoke": outcome.revoke.account_id})
    if outcome.restore is not None and outcome.restore.account_id:
        await bus.publish(c.AccountKeysRestored(account_id=outcome.restore.account_id),
                          message_id=f"restore:{outcome.event_id}")
        actions.append({"restore": outcome.restore.account_id})
    return c.WebhookOutcome(event_id=outcome.event_id, event_type=outcome.event_type,
                            applied=outcome.outcome == "applied" and not outcome.duplicate, actions=actions)


async def on_job_ready(event: JobReady, *, envelope: Envelope, deps: BillingDependencies) -> None:
    await handlers.record_usage(event.job_id, event.account_id, event.characters, envelope.occurred_at,
                                repository=deps.repository, settings=deps.settings, hold_id=event.hold_id)


async def on_job_failed(event: JobFailed, *, envelope: Envelope, deps: BillingDependencies) -> None:
    # A failed job is never billed; only its hold (if it had one) is given back. A ready job whose audio later
    # expires also fails: its hold is long gone and its usage stays.
    if event.hold_id is not None:
        await handlers.release_hold(event.account_id, event.hold_id, repository=deps.repository)


async def on_account_purge(event: AccountPurgeRequested, *, envelope: Envelope, deps: BillingDependencies,
                           bus: MessageBus) -> None:
    async with bus.transaction():
        removed = await deps.repository.delete_account(event.account_id)
        await bus.publish(AccountPurged(account_id=event.account_id, purge_id=event.purge_id, service="billing",
                                        removed=removed))
