"""Checkout and webhooks through the official stripe SDK against the fake Stripe API and real PostgreSQL."""
from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlparse

import asyncpg
import pytest

from timbre_billing import handlers
from timbre_billing.adapters.repository import BillingRepository
from timbre_billing.adapters.stripe_gateway import StripeGateway, StripeUnavailable
from timbre_billing.adapters.webhooks import SignatureExpired, SignatureInvalid
from timbre_billing.domain import BillingDisabled, UnknownCheckoutToken
from timbre_billing.settings import BillingSettings


async def _tables(pool: asyncpg.Pool) -> dict[str, list[Any]]:
    out = {}
    for table in ("customers", "checkout_tokens", "subscriptions", "stripe_events", "usage_ledger"):
        rows = await pool.fetch(f"SELECT * FROM {table} ORDER BY 1")  # noqa: S608 - fixed table names
        out[table] = [tuple(r.values()) for r in rows]
    return out


async def _webhook(fake: Any, repo: BillingRepository, gw: StripeGateway, settings: BillingSettings,
                   event_type: str, obj: dict[str, Any], **kw: Any) -> Any:
    body, header = fake.signed(event_type, obj, **kw)
    return await handlers.handle_stripe_webhook(body, header, repository=repo, stripe=gw, settings=settings)


async def _paid_checkout(fake: Any, repo: BillingRepository, gw: StripeGateway, settings: BillingSettings,
                         email: str = "ada@example.com", account_id: str | None = None) -> tuple[str, Any]:
    start = await handlers.start_checkout(email, repository=repo, stripe=gw, settings=settings,
                                          account_id=account_id)
    session = fake.state.complete_session(start.session_id)
    outcome = await _webhook(fake, repo, gw, settings, "checkout.session.completed", session)
    return session["client_reference_id"], outcome


async def test_checkout_session_created_with_token_and_urls(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any
) -> None:
    start = await handlers.start_checkout(" Ada@Example.com ", repository=repository, stripe=gateway,
                                          settings=settings_on)
    assert not start.already_subscribed and start.url.startswith("https://checkout.stripe.test/")
    session = stripe_fake.state.sessions[start.session_id]
    token = session["client_reference_id"]
    assert len(token) >= 40 and session["customer_email"] == "ada@example.com"
    assert session["_price"] == "price_hobby" and session["mode"] == "subscription"
    success = urlparse(session["success_url"])
    assert success.netloc == "timbre.test" and parse_qs(success.query)["token"] == [token]
    assert session["_idempotency_key"] == f"checkout-{token}"
    status = await handlers.checkout_status(token, repository=repository)
    assert not status.paid and status.account_id is None


async def test_an_unauthenticated_answer_never_depends_on_the_email(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any
) -> None:
    """Not an oracle: a subscribed address, one known to Stripe only and an unknown one get the same answer (a
    checkout for a new account); only the subscriber's own key hears that it is already subscribed."""
    customer = stripe_fake.state.create_customer("grace@example.com")
    stripe_fake.state.create_subscription(customer["id"], "price_hobby")
    _, paid = await _paid_checkout(stripe_fake, repository, gateway, settings_on, "alan@example.com")
    answers = []
    for email in ("grace@example.com", "alan@example.com", "nobody@example.com"):
        requests_before = len(stripe_fake.state.requests)
        start = await handlers.start_checkout(email, repository=repository, stripe=gateway, settings=settings_on)
        session = stripe_fake.state.sessions[start.session_id]
        answers.append((start.already_subscribed, start.url.split("/c/pay/")[0], session["customer"]))
        # Nothing was asked of Stripe about the address: one request, the session itself.
        assert [path for _, path, _ in stripe_fake.state.requests[requests_before:]] == ["/v1/checkout/sessions"]
    assert answers == [(False, "https://checkout.stripe.test", None)] * 3
    sessions_before = len(stripe_fake.state.sessions)
    own = await handlers.start_checkout("alan@example.com", repository=repository, stripe=gateway,
                                        settings=settings_on, account_id=paid.provision.account_id)
    assert own.already_subscribed and own.url == "https://timbre.test/v1/checkout/already-subscribed"
    assert len(stripe_fake.state.sessions) == sessions_before


async def test_open_checkouts_expire_with_their_stripe_session(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any,
    pool: asyncpg.Pool
) -> None:
    now = time.time()
    old = await handlers.start_checkout("old@example.com", repository=repository, stripe=gateway,
                                        settings=settings_on, now=now)
    fresh = await handlers.start_checkout("new@example.com", repository=repository, stripe=gateway,
                                          settings=settings_on, now=now)
    # The Stripe session lives as long as the token (within Stripe's 24 h).
    assert int(stripe_fake.state.sessions[old.session_id]["expires_at"]) == int(now + settings_on.stripe_session_ttl_s)
    _, paid = await _paid_checkout(stripe_fake, repository, gateway, settings_on, "paid@example.com")
    await pool.execute("UPDATE checkout_tokens SET created_at = now() - interval '3 days'"
                       " WHERE session_id = ANY($1::text[]) OR status = 'paid'", [old.session_id])
    assert await handlers.expire_checkouts(repository=repository, settings=settings_on) == 1
    rows = await pool.fetch("SELECT session_id, status FROM checkout_tokens ORDER BY status")
    assert {(r["session_id"], r["status"]) for r in rows} == {(fresh.session_id, "open"),
                                                              (rows[-1]["session_id"], "paid")}
    assert old.session_id not in {r["session_id"] for r in rows}


async def test_paid_checkout_reports_paid_with_its_account(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any
) -> None:
    start = await handlers.start_checkout("ada@example.com", repository=repository, stripe=gateway,
                                          settings=settings_on)
    session = stripe_fake.state.complete_session(start.session_id)
    token = session["client_reference_id"]
    assert not (await handlers.checkout_status(token, repository=repository)).paid
    outcome = await _webhook(stripe_fake, repository, gateway, settings_on, "checkout.session.completed",
                             session)
    provision = outcome.provision
    assert outcome.outcome == "applied" and provision is not None and provision.new_account
    assert provision.checkout_token == token and provision.email == "ada@example.com"
    account_id = str(uuid.UUID(provision.account_id))
    # Paid is all billing knows: every read says so (the gateway, not billing, shows the key once).
    for _ in range(2):
        paid = await handlers.checkout_status(token, repository=repository)
        assert (paid.paid, paid.account_id, paid.customer_id, paid.email) == (
            True, account_id, provision.customer_id, "ada@example.com")
    with pytest.raises(UnknownCheckoutToken):
        await handlers.checkout_status("nope", repository=repository)


async def test_unpaid_checkout_session_leaves_the_token_open(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any
) -> None:
    start = await handlers.start_checkout("ada@example.com", repository=repository, stripe=gateway,
                                          settings=settings_on)
    session = {**stripe_fake.state.complete_session(start.session_id), "payment_status": "unpaid"}
    outcome = await _webhook(stripe_fake, repository, gateway, settings_on, "checkout.session.completed",
                             session)
    assert outcome.outcome == "ignored" and outcome.provision is None
    status = await handlers.checkout_status(session["client_reference_id"], repository=repository)
    assert not status.paid and status.account_id is None


async def test_resubscribing_with_the_key_keeps_the_account_and_a_stranger_gets_a_new_one(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any
) -> None:
    _, first = await _paid_checkout(stripe_fake, repository, gateway, settings_on)
    sub = stripe_fake.state.subscriptions[first.provision.subscription_id]
    sub["status"] = "canceled"
    await _webhook(stripe_fake, repository, gateway, settings_on, "customer.subscription.deleted", sub,
                   created=int(time.time()) + 5)
    # Someone who only knows the lapsed customer's email pays: a new customer and a new, empty account.
    _, stranger = await _paid_checkout(stripe_fake, repository, gateway, settings_on)
    assert stranger.provision.account_id != first.provision.account_id and stranger.provision.new_account
    assert stranger.provision.customer_id != first.provision.customer_id
    # The owner renews with the account's key (an authenticated checkout): same account, same Customer.
    _, second = await _paid_checkout(stripe_fake, repository, gateway, settings_on,
                                     account_id=first.provision.account_id)
    assert second.provision.account_id == first.provision.account_id and not second.provision.new_account
    assert second.provision.customer_id == first.provision.customer_id  # the checkout reused the Customer
    decision = await handlers.check_quota(first.provision.account_id, 1, repository=repository,
                                          settings=settings_on)
    assert decision.allowed


async def test_a_new_account_checkout_never_follows_a_customer_tied_to_another_account(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any
) -> None:
    """Were Stripe to hand a new-account checkout an existing customer, the payment provisions nothing."""
    _, victim = await _paid_checkout(stripe_fake, repository, gateway, settings_on, "victim@example.com")
    start = await handlers.start_checkout("victim@example.com", repository=repository, stripe=gateway,
                                          settings=settings_on)
    stripe_fake.state.sessions[start.session_id]["customer"] = victim.provision.customer_id
    session = stripe_fake.state.complete_session(start.session_id)
    outcome = await _webhook(stripe_fake, repository, gateway, settings_on, "checkout.session.completed", session)
    assert outcome.outcome == "ignored" and outcome.provision is None
    assert not (await handlers.checkout_status(session["client_reference_id"], repository=repository)).paid


async def test_webhook_signatures(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any,
    pool: asyncpg.Pool
) -> None:
    obj = {"id": "cus_x", "object": "customer"}
    kw = {"repository": repository, "stripe": gateway, "settings": settings_on}
    body, header = stripe_fake.signed("customer.created", obj)
    with pytest.raises(SignatureInvalid) as invalid:
        await handlers.handle_stripe_webhook(body.replace(b"cus_x", b"cus_y"), header, **kw)
    assert invalid.value.code == "signature_invalid"
    body, header = stripe_fake.signed("customer.created", obj, secret="whsec_wrong")
    with pytest.raises(SignatureInvalid):
        await handlers.handle_stripe_webhook(body, header, **kw)
    for skew in (-600, 600):
        body, header = stripe_fake.signed("customer.created", obj, timestamp=int(time.time()) + skew)
        with pytest.raises(SignatureExpired) as expired:
            await handlers.handle_stripe_webhook(body, header, **kw)
        assert expired.value.code == "signature_expired"
    assert await pool.fetchval("SELECT count(*) FROM stripe_events") == 0
    # The good one and one signed with the previous (rotated) secret are accepted; unknown types are no-ops.
    for secret in ("whsec_current_a1b2c3", "whsec_previous_d4e5f6"):
        body, header = stripe_fake.signed("customer.created", obj, secret=secret)
        outcome = await handlers.handle_stripe_webhook(body, header, **kw)
        assert outcome.outcome == "ignored" and not outcome.duplicate
    assert await pool.fetchval("SELECT count(*) FROM stripe_events WHERE outcome = 'ignored'") == 2


async def test_resent_event_changes_nothing(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any,
    pool: asyncpg.Pool
) -> None:
    start = await handlers.start_checkout("ada@example.com", repository=repository, stripe=gateway,
                                          settings=settings_on)
    session = stripe_fake.state.complete_session(start.session_id)
    body, header = stripe_fake.signed("checkout.session.completed", session)
    kw = {"repository": repository, "stripe": gateway, "settings": settings_on}
    first = await handlers.handle_stripe_webhook(body, header, **kw)
    before = await _tables(pool)
    calls_before = len(stripe_fake.state.requests)
    again = await handlers.handle_stripe_webhook(body, header, **kw)
    assert await _tables(pool) == before
    assert len(stripe_fake.state.requests) == calls_before  # no second subscription fetch
    # The same request comes back so a caller whose publish failed can publish it again.
    assert again.duplicate and again.provision == first.provision and again.outcome == "applied"


async def test_out_of_order_events_do_not_resurrect(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any
) -> None:
    _, outcome = await _paid_checkout(stripe_fake, repository, gateway, settings_on)
    sub_id = outcome.provision.subscription_id
    sub = stripe_fake.state.subscriptions[sub_id]
    t = int(time.time())
    canceled = {**sub, "status": "canceled", "ended_at": t}
    deleted = await _webhook(stripe_fake, repository, gateway, settings_on, "customer.subscription.deleted",
                             canceled, created=t + 20)
    assert deleted.revoke is not None and deleted.revoke.reason == "canceled"
    # An update sent before the deletion, delivered after it, and even one stamped later.
    for created in (t + 10, t + 30):
        late = await _webhook(stripe_fake, repository, gateway, settings_on, "customer.subscription.updated",
                              {**sub, "status": "active"}, created=created)
        assert late.outcome == "stale" and late.revoke is None
    assert (await repository.subscription(sub_id)).status == "canceled"


async def test_older_update_does_not_overwrite_newer(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any
) -> None:
    _, outcome = await _paid_checkout(stripe_fake, repository, gateway, settings_on)
    sub = stripe_fake.state.subscriptions[outcome.provision.subscription_id]
    t = int(time.time())
    await _webhook(stripe_fake, repository, gateway, settings_on, "customer.subscription.updated",
                   {**sub, "status": "past_due"}, created=t + 50)
    old = await _webhook(stripe_fake, repository, gateway, settings_on, "customer.subscription.updated",
                         {**sub, "status": "active"}, created=t + 40)
    assert old.outcome == "stale"
    assert (await repository.subscription(sub["id"])).status == "past_due"


async def test_unpaid_yields_revoke_once(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any
) -> None:
    _, outcome = await _paid_checkout(stripe_fake, repository, gateway, settings_on)
    account_id = outcome.provision.account_id
    sub = stripe_fake.state.subscriptions[outcome.provision.subscription_id]
    t = int(time.time())
    unpaid = await _webhook(stripe_fake, repository, gateway, settings_on, "customer.subscription.updated",
                            {**sub, "status": "unpaid"}, created=t + 5)
    assert unpaid.revoke is not None
    assert (unpaid.revoke.account_id, unpaid.revoke.reason) == (account_id, "unpaid")
    again = await _webhook(stripe_fake, repository, gateway, settings_on, "customer.subscription.updated",
                           {**sub, "status": "unpaid"}, created=t + 6)
    assert again.outcome == "applied" and again.revoke is None
    decision = await handlers.check_quota(account_id, 1, repository=repository, settings=settings_on)
    assert (decision.allowed, decision.reason) == (False, "subscription_unpaid")
    # Paid after all: the keys come back.
    paid = await _webhook(stripe_fake, repository, gateway, settings_on, "customer.subscription.updated",
                          {**sub, "status": "active"}, created=t + 7)
    assert paid.restore is not None and paid.restore.account_id == account_id and paid.revoke is None


async def test_period_synced_from_update(
    repository: BillingRepository, gateway: StripeGateway, settings_on: BillingSettings, stripe_fake: Any
) -> None:
    _, outcome = await _paid_checkout(stripe_fake, repository, gateway, settings_on)
    sub = stripe_fake.state.subscriptions[outcome.provision.subscription_id]
    item = sub["items"]["data"][0]
    renewed = {**sub, "items": {**sub["items"], "data": [{**item, "current_period_start": 1_900_000_000,
                                                           "current_period_end": 1_902_592_000}]}}
    await _webhook(stripe_fake, repository, gateway, settings_on, "customer.subscription.updated", renewed,
                   created=int(time.time()) + 1)
    stored = await repository.subscription(sub["id"])
    assert int(stored.current_period_start.timestamp()) == 1_900_000_000
    assert int(stored.current_period_end.timestamp()) == 1_902_592_000


async def test_sdk_errors_map_to_stripe_unavailable(gateway: StripeGateway, stripe_fake: Any) -> None:
    with pytest.raises(StripeUnavailable):
        await gateway.retrieve_subscription("sub_missing")
    assert await gateway.find_active_subscription("cus_nobody") is None


async def test_billing_off_refuses_stripe_operations(
    repository: BillingRepository, gateway: StripeGateway, settings_off: BillingSettings
) -> None:
    with pytest.raises(BillingDisabled):
        await handlers.start_checkout("ada@example.com", repository=repository, stripe=gateway,
                                      settings=settings_off)
