"""Stripe webhook signature verification over several secrets (rotation) with a tolerance window."""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from typing import ClassVar

from ..domain import StripeEvent


class WebhookRejected(Exception):
    """A webhook delivery that must not be applied (answer 400); `code` is the stable error code."""

    code: ClassVar[str] = "signature_invalid"


class SignatureInvalid(WebhookRejected):
    """No configured secret produced a signature in the header, or the header is malformed."""

    code: ClassVar[str] = "signature_invalid"


class SignatureExpired(WebhookRejected):
    """The signature is valid but its timestamp is outside the tolerance window (a replay, a skewed clock)."""

    code: ClassVar[str] = "signature_expired"


class MalformedEvent(WebhookRejected):
    """A correctly signed body that is not a Stripe event."""


def _parse_header(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError as exc:
                raise SignatureInvalid("malformed Stripe-Signature timestamp") from exc
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureInvalid("Stripe-Signature lacks t= or v1=")
    return timestamp, signatures


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    """The v1 signature Stripe sends for `payload` at `timestamp`."""
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def verify_signature(
    payload: bytes, header: str, secrets: Sequence[str], *, tolerance_s: int, now: float | None = None
) -> int:
    """Check the header against every secret; returns the signed timestamp or raises."""
    if not secrets:
        raise SignatureInvalid("no webhook secret configured")
    timestamp, signatures = _parse_header(header or "")
    expected = [sign(payload, secret, timestamp) for secret in secrets]
    # Compare every pair so timing does not reveal which secret or signature matched.
    matched = False
    for exp in expected:
        for got in signatures:
            matched |= hmac.compare_digest(exp, got)
    if not matched:
        raise SignatureInvalid("no signature matches a configured secret")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise SignatureExpired("signature timestamp outside the tolerance window")
    return timestamp


def verify_event(
    payload: bytes, header: str, secrets: Sequence[str], *, tolerance_s: int, now: float | None = None
) -> StripeEvent:
    """Verify a delivery and parse it into a StripeEvent."""
    verify_signature(payload, header, secrets, tolerance_s=tolerance_s, now=now)
    try:
        body = json.loads(payload)
        obj = body["data"]["object"]
        event = StripeEvent(
            id=str(body["id"]), type=str(body["type"]), created=int(body["created"]), object=obj
        )
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise MalformedEvent("signed body is not a Stripe event") from exc
    if not event.id.startswith("evt_") or not isinstance(obj, dict):
        raise MalformedEvent("signed body is not a Stripe event")
    return event
