"""Webhook signature verification: any configured secret, tolerance window, typed errors."""
from __future__ import annotations

import json
import time
from typing import Any

import pytest
import stripe

from timbre_billing.adapters.webhooks import MalformedEvent, SignatureExpired, SignatureInvalid, verify_event
from timbre_billing.bus_adapters import _domain_errors
from timbre_common.messaging import RpcError

SECRETS = ["whsec_new", "whsec_old"]
BODY = json.dumps(
    {"id": "evt_1", "type": "customer.created", "created": 1, "data": {"object": {"id": "cus_1"}}}
).encode()


def test_good_signature_accepted_and_matches_the_official_sdk(stripe_sign: Any) -> None:
    header = stripe_sign(BODY, "whsec_new")
    assert verify_event(BODY, header, SECRETS, tolerance_s=300).id == "evt_1"
    assert stripe.WebhookSignature.verify_header(BODY.decode(), header, "whsec_new", 300)


def test_rotated_second_secret_accepted(stripe_sign: Any) -> None:
    event = verify_event(BODY, stripe_sign(BODY, "whsec_old"), SECRETS, tolerance_s=300)
    assert event.type == "customer.created"


def test_tampered_body_refused(stripe_sign: Any) -> None:
    header = stripe_sign(BODY, "whsec_new")
    with pytest.raises(SignatureInvalid):
        verify_event(BODY.replace(b"cus_1", b"cus_2"), header, SECRETS, tolerance_s=300)


@pytest.mark.parametrize("header", ["", "garbage", "t=abc,v1=00", "t=123", "v1=00"])
def test_malformed_header_refused(header: str) -> None:
    with pytest.raises(SignatureInvalid):
        verify_event(BODY, header, SECRETS, tolerance_s=300)


def test_wrong_secret_refused(stripe_sign: Any) -> None:
    with pytest.raises(SignatureInvalid):
        verify_event(BODY, stripe_sign(BODY, "whsec_attacker"), SECRETS, tolerance_s=300)


def test_stale_and_future_timestamps_refused(stripe_sign: Any) -> None:
    now = int(time.time())
    with pytest.raises(SignatureExpired):
        verify_event(BODY, stripe_sign(BODY, "whsec_new", now - 301), SECRETS, tolerance_s=300)
    with pytest.raises(SignatureExpired):
        verify_event(BODY, stripe_sign(BODY, "whsec_new", now + 301), SECRETS, tolerance_s=300)
    assert verify_event(BODY, stripe_sign(BODY, "whsec_new", now - 290), SECRETS, tolerance_s=300)


def test_signed_non_event_refused(stripe_sign: Any) -> None:
    body = b'{"hello": "world"}'
    with pytest.raises(MalformedEvent):
        verify_event(body, stripe_sign(body, "whsec_new"), SECRETS, tolerance_s=300)


def test_signed_deeply_nested_body_is_malformed_not_a_crash(stripe_sign: Any) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(MalformedEvent):
        verify_event(body, stripe_sign(body, "whsec_new"), SECRETS, tolerance_s=300)


@pytest.mark.parametrize(("error", "code"), [(SignatureInvalid("bad"), "signature_invalid"),
                                             (SignatureExpired("old"), "signature_expired")])
async def test_rejections_keep_their_own_code_on_the_bus(error: Exception, code: str) -> None:
    with pytest.raises(RpcError) as info:
        async with _domain_errors():
            raise error
    assert (info.value.code, info.value.status) == (code, 400)
