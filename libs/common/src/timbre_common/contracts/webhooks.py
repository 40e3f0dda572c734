"""Client webhooks: the gateway's own schedule of deliveries to its customers' endpoints."""
from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from .base import Event

# The events a client can subscribe an endpoint to.
WEBHOOK_EVENTS = ("job.ready", "job.failed", "voice.deleted", "account.purged")


class WebhookDeliveryDue(Event):
    """One delivery's next attempt is due at `due_at`; `attempt` is the number of attempts already made.

    A copy that finds the delivery already past that attempt (a duplicate, a stale hop) is dropped.
    """

    TYPE: ClassVar[str] = "webhook.delivery_due"
    delivery_id: str
    account_id: str
    attempt: int = 0
    due_at: datetime
