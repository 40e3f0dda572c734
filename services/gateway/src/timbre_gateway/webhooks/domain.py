"""Rules of client webhooks, without I/O: secrets, signatures, event bodies, the retry schedule."""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable
from datetime import datetime
from typing import Any

SECRET_PREFIX = "whsec_"
SIGNATURE_HEADER = "Timbre-Signature"
EVENT_ID_HEADER = "Timbre-Event-Id"
EVENT_TYPE_HEADER = "Timbre-Event-Type"
ATTEMPT_HEADER = "Timbre-Delivery-Attempt"
# Roughly 24 hours of exponential back-off after the first attempt; the last one fails into `parked`.
DEFAULT_SCHEDULE_S: tuple[float, ...] = (10, 30, 120, 600, 1800, 3600, 7200, 14400, 21600, 36000)


def mint_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def sign(body: bytes, secrets_: Iterable[str], timestamp: int) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "{t}.{body}">` with one v1 per valid secret."""
    signed = f"{timestamp}.".encode() + body
    parts = [f"t={timestamp}"]
    for secret in secrets_:
        parts.append("v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest())
    return ",".join(parts)


def event_body(event_id: str, event_type: str, occurred_at: datetime, data: dict[str, Any]) -> str:
    """The JSON a receiver gets, built once and kept, so every attempt signs the same bytes."""
    return json.dumps({"id": event_id, "type": event_type, "created_at": occurred_at.isoformat(), "data": data},
                      separators=(",", ":"), sort_keys=True, default=str)


def parse_schedule(text: str) -> tuple[float, ...]:
    """`WEBHOOK_RETRY_SCHEDULE_S`: comma-separated seconds to wait before each retry."""
    delays = tuple(float(p) for p in text.split(",") if p.strip())
    if any(d <= 0 for d in delays):
        raise ValueError("every retry delay must be positive")
    return delays


def next_delay(schedule: tuple[float, ...], attempts_made: int) -> float | None:
    """Seconds until the next attempt after `attempts_made` attempts failed; None once the schedule is spent."""
    if attempts_made < 1 or attempts_made > len(schedule):
        return None
    return schedule[attempts_made - 1]


def hop_delay(remaining_s: float, tiers: tuple[int, ...]) -> int:
    """The longest retry tier that does not overshoot `remaining_s` (the shortest when all would)."""
    fitting = [t for t in tiers if t <= remaining_s]
    return max(fitting) if fitting else min(tiers)
