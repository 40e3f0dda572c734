"""Verify what a Timbre webhook delivered: `Timbre-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>]`, each v1 an
HMAC-SHA256 of `{t}.{body}` under one of the endpoint's secrets (two while a rotation's grace lasts)."""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable

from ._errors import WebhookVerificationError
from .models import WebhookEvent

SIGNATURE_HEADER = "Timbre-Signature"
EVENT_ID_HEADER = "Timbre-Event-Id"
DEFAULT_TOLERANCE_S = 300


def _parse(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    signatures: list[str] = []
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise WebhookVerificationError("the signature's timestamp is not a number") from None
        elif name == "v1" and value:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise WebhookVerificationError("not a Timbre-Signature header (t=...,v1=...)")
    return timestamp, signatures


def verify(payload: bytes | str, header: str, secret: str | Iterable[str], *,
           tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> WebhookEvent:
    """The event, once its signature matches one of `secret` (a string, or several during your own rotation)
    and its timestamp is within `tolerance_s` of now; WebhookVerificationError otherwise."""
    body = payload.encode() if isinstance(payload, str) else bytes(payload)
    timestamp, signatures = _parse(header)
    current = time.time() if now is None else now
    if tolerance_s and abs(current - timestamp) > tolerance_s:
        raise WebhookVerificationError(f"the signature is {abs(current - timestamp):.0f} s old, past the tolerance")
    secrets = [secret] if isinstance(secret, str) else list(secret)
    signed = f"{timestamp}.".encode() + body
    for key in secrets:
        expected = hmac.new(key.encode(), signed, hashlib.sha256).hexdigest()
        if any(hmac.compare_digest(expected, given) for given in signatures):
            try:
                return WebhookEvent.model_validate(json.loads(body))
            except ValueError as exc:
                raise WebhookVerificationError(f"the body is not a Timbre event: {exc}") from None
    raise WebhookVerificationError("no signature matches the secret")
