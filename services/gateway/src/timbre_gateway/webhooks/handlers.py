"""Webhook handlers of the gateway.

Consumes: job.ready, job.failed, voice.deleted (queue gateway.webhook_events) -> one delivery per endpoint that
wants the event (or that a synthesis request named); the gateway's own account purge -> account.purged;
webhook.delivery_due (queue gateway.webhook_deliveries) -> one signed POST, then delivered, retried later
(the schedule hops through the bus's retry tiers) or parked.
Emits: webhook.delivery_due.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any, Protocol

from timbre_common import metrics
from timbre_common.contracts import Envelope, utcnow
from timbre_common.contracts.synthesis import JobFailed, JobReady
from timbre_common.contracts.voices import VoiceDeleted
from timbre_common.contracts.webhooks import WebhookDeliveryDue
from timbre_common.logging import get_logger

from . import domain
from .repository import WebhookRepository

log = get_logger(__name__)


class DeliveryError(Exception):
    """An attempt that got no answer (refused target, timeout, connection error)."""


class Scheduler(Protocol):
    async def schedule(self, due: WebhookDeliveryDue) -> None: ...

    async def later(self, due: WebhookDeliveryDue) -> None: ...


class Sender(Protocol):
    async def post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, str]: ...


class EndpointSlots:
    """Deliveries in flight per endpoint, bounded: a slow endpoint holds its own slots, never another's."""

    def __init__(self, per_endpoint: int) -> None:
        self.per_endpoint = per_endpoint
        self._busy: dict[str, int] = {}

    def try_acquire(self, endpoint: str) -> bool:
        if self._busy.get(endpoint, 0) >= self.per_endpoint:
            return False
        self._busy[endpoint] = self._busy.get(endpoint, 0) + 1
        return True

    def release(self, endpoint: str) -> None:
        left = self._busy.get(endpoint, 1) - 1
        if left <= 0:
            self._busy.pop(endpoint, None)
        else:
            self._busy[endpoint] = left


async def _announce(*, event_type: str, account_id: str, data: dict[str, Any], envelope: Envelope,
                    webhooks: WebhookRepository, scheduler: Scheduler, job_id: str | None = None) -> int:
    endpoints = await webhooks.endpoints_for(account_id, event_type, job_id)
    if not endpoints:
        return 0
    payload = domain.event_body(envelope.message_id, event_type, envelope.occurred_at, data)
    made = await webhooks.create_deliveries(event_id=envelope.message_id, event_type=event_type,
                                            account_id=account_id, payload=payload, endpoints=endpoints)
    for row in made:
        await scheduler.schedule(WebhookDeliveryDue(delivery_id=str(row["delivery_id"]), account_id=account_id,
                                                    attempt=0, due_at=utcnow()))
    return len(made)


async def on_job_ready(event: JobReady, *, envelope: Envelope, webhooks: WebhookRepository,
                       scheduler: Scheduler) -> None:
    data = {"job_id": event.job_id, "voice_id": event.voice_id, "backend": event.backend,
            "characters": event.characters, "expires_at": event.expires_at.isoformat() if event.expires_at else None}
    await _announce(event_type="job.ready", account_id=event.account_id, data=data, envelope=envelope,
                    webhooks=webhooks, scheduler=scheduler, job_id=event.job_id)


async def on_job_failed(event: JobFailed, *, envelope: Envelope, webhooks: WebhookRepository,
                        scheduler: Scheduler) -> None:
    data = {"job_id": event.job_id, "code": event.code, "reason": event.reason}
    await _announce(event_type="job.failed", account_id=event.account_id, data=data, envelope=envelope,
                    webhooks=webhooks, scheduler=scheduler, job_id=event.job_id)


async def on_voice_deleted(event: VoiceDeleted, *, envelope: Envelope, webhooks: WebhookRepository,
                           scheduler: Scheduler) -> None:
    await _announce(event_type="voice.deleted", account_id=event.account_id, data={"voice_id": event.voice_id},
                    envelope=envelope, webhooks=webhooks, scheduler=scheduler)


async def announce_purge(*, account_id: str, purge_id: str, envelope: Envelope, webhooks: WebhookRepository,
                         scheduler: Scheduler) -> int:
    """account.purged to the endpoints that want it, then every webhook row of the account goes; rows removed."""
    payload = domain.event_body(envelope.message_id, "account.purged", envelope.occurred_at,
                                {"account_id": account_id, "purge_id": purge_id})
    made, removed = await webhooks.purge_account(account_id=account_id, event_id=envelope.message_id,
                                                 payload=payload)
    for row in made:
        await scheduler.schedule(WebhookDeliveryDue(delivery_id=str(row["delivery_id"]), account_id=account_id,
                                                    attempt=0, due_at=utcnow()))
    return removed


async def on_delivery_due(due: WebhookDeliveryDue, *, envelope: Envelope, webhooks: WebhookRepository,
                          scheduler: Scheduler, sender: Sender, slots: EndpointSlots,
                          schedule: tuple[float, ...]) -> str:
    """Make the attempt that is due; returns what happened (for logs and tests)."""
    if (due.due_at - utcnow()).total_seconds() > 0.5:
        await scheduler.schedule(due)
        return "waiting"
    row = await webhooks.get_delivery(due.delivery_id)
    if row is None or row["status"] != "pending" or row["attempts"] != due.attempt:
        return "stale"
    endpoint = str(row["webhook_id"])
    if not slots.try_acquire(endpoint):
        # The endpoint is busy with earlier deliveries: wait a little, without spending an attempt.
        await scheduler.later(due)
        return "deferred"
    try:
        return await _attempt(due, webhooks=webhooks, scheduler=scheduler, sender=sender, schedule=schedule)
    finally:
        slots.release(endpoint)


async def _attempt(due: WebhookDeliveryDue, *, webhooks: WebhookRepository, scheduler: Scheduler, sender: Sender,
                   schedule: tuple[float, ...]) -> str:
    row = await webhooks.claim_attempt(due.delivery_id, due.attempt)
    if row is None:
        return "stale"
    attempt = row["attempts"]
    secrets = row["secrets_snapshot"] or await webhooks.signing_secrets(str(row["webhook_id"]))
    if not secrets:
        return "stale"  # the endpoint was deleted meanwhile, and its deliveries with it
    body = row["payload"].encode()
    headers = {"Content-Type": "application/json", "User-Agent": "Timbre-Webhooks/1",
               domain.SIGNATURE_HEADER: domain.sign(body, secrets, int(time.time())),
               domain.EVENT_ID_HEADER: row["event_id"], domain.EVENT_TYPE_HEADER: row["event_type"],
               domain.ATTEMPT_HEADER: str(attempt)}
    started, clock = utcnow(), time.perf_counter()
    status: int | None = None
    answer: str | None = None
    try:
        status, answer = await sender.post(row["url"], headers, body)
        error = None if 200 <= status < 300 else (
            f"redirect not followed (HTTP {status})" if 300 <= status < 400 else f"HTTP {status}")
    except DeliveryError as exc:
        error = str(exc)[:500] or type(exc).__name__
    duration_ms = int((time.perf_counter() - clock) * 1000)
    next_at: datetime | None = None
    if error is None:
        outcome = "delivered"
    else:
        delay = domain.next_delay(schedule, attempt)
        outcome = "parked" if delay is None else "pending"
        next_at = utcnow() + timedelta(seconds=delay) if delay is not None else None
    await webhooks.record_attempt(delivery_id=due.delivery_id, attempt=attempt, started_at=started,
                                  duration_ms=duration_ms, status_code=status, error=error, response=answer,
                                  outcome=outcome, next_attempt_at=next_at)
    fields = {"delivery_id": due.delivery_id, "webhook_id": str(row["webhook_id"]), "event_type": row["event_type"],
              "attempt": attempt, "status_code": status, "ms": duration_ms}
    # The metric says "failed" where the row says "pending": an attempt that failed and will be retried.
    metrics.WEBHOOK_DELIVERIES.labels(row["event_type"], "failed" if outcome == "pending" else outcome).inc()
    if outcome == "delivered":
        log.info("webhook_delivered", **fields)
    elif outcome == "parked":
        log.error("webhook_delivery_parked", error=error, **fields)
    else:
        log.warning("webhook_delivery_failed", error=error, retry_at=next_at.isoformat() if next_at else None,
                    **fields)
        await scheduler.schedule(WebhookDeliveryDue(delivery_id=due.delivery_id, account_id=due.account_id,
                                                    attempt=attempt, due_at=next_at or utcnow()))
    return outcome


async def resend_stalled(*, webhooks: WebhookRepository, scheduler: Scheduler, overdue_s: float) -> int:
    """Send again the messages of deliveries long past due (lost between the database and the broker)."""
    stalled = await webhooks.stalled_deliveries(overdue_s=overdue_s)
    for row in stalled:
        await scheduler.schedule(WebhookDeliveryDue(delivery_id=str(row["delivery_id"]),
                                                    account_id=str(row["account_id"]), attempt=row["attempts"],
                                                    due_at=utcnow()))
    if stalled:
        log.warning("webhook_deliveries_resent", deliveries=len(stalled))
    return len(stalled)
