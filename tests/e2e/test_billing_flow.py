"""The hosted billing flow over HTTP: every service as a process, billing on, the official stripe SDK pointed
at a local fake Stripe, webhooks signed the way Stripe signs them and posted to the gateway."""
from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import asyncpg
import httpx
import pytest

from timbre_common.catalogue import SYSTEM_VOICES
from timbre_common.contracts.synthesis import JobReady
from timbre_common.messaging import Bus
from timbre_common.testing import headless_dom, load_module

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")

# Fresh per run, so a grep of the logs for them means something.
STRIPE_KEY = f"sk_test_{secrets.token_hex(16)}"
WHSEC_OLD = f"whsec_{secrets.token_hex(16)}"
WHSEC_NEW = f"whsec_{secrets.token_hex(16)}"
PRICE = "price_e2e_hobby"
QUOTA = 300


e2e = load_module("timbre_e2e_conftest", ROOT / "tests/e2e/conftest.py")
fake_stripe = load_module("timbre_billing_tests_fake_stripe", ROOT / "services/billing/tests/fake_stripe.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until(check: Callable[[], Any], what: str, timeout: float = 30.0, every: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    raise AssertionError(f"not within {timeout}s: {what}")


@dataclass
class Subscriber:
    email: str
    token: str
    session: dict[str, Any]
    subscription_id: str
    customer_id: str
    completed_event: bytes
    key: str = ""


class BillingPlatform:
    """The running platform with billing on, and the fake Stripe it talks to."""

    def __init__(self, client: Any, stripe_server: Any) -> None:
        self.client, self.http, self.stripe = client, client.http, stripe_server.state

    # Stripe's side ------------------------------------------------------------------------------------
    def webhook(self, event_type: str, obj: dict[str, Any], *, secret: str = WHSEC_NEW,
                created: int | None = None) -> httpx.Response:
        body = fake_stripe.build_event(event_type, obj, created=created)
        return self.post_webhook(body, fake_stripe.sign_header(body, secret))

    def post_webhook(self, body: bytes, signature: str | None) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["Stripe-Signature"] = signature
        return self.http.post("/v1/webhooks/stripe", content=body, headers=headers)

    def subscription(self, subscriber: Subscriber) -> dict[str, Any]:
        return self.stripe.subscriptions[subscriber.subscription_id]

    # The customer's side ------------------------------------------------------------------------------
    def start_checkout(self, email: str, key: str | None = None) -> tuple[str, dict[str, Any]]:
        """POST /v1/checkout (with `key`: a renewal of its account); the fake's session and the success token."""
        r = self.http.post("/v1/checkout", json={"email": email}, headers=self.auth(key) if key else {})
        assert r.status_code == 200, r.text
        assert r.json()["already_subscribed"] is False
        url = r.json()["url"]
        session = next(s for s in self.stripe.sessions.values() if s["url"] == url)
        success = urlparse(session["success_url"])
        assert f"{success.scheme}://{success.netloc}" == self.client.base_url
        assert success.path == "/v1/checkout/success"
        return parse_qs(success.query)["token"][0], session

    def status(self, token: str) -> dict[str, Any]:
        r = self.http.get("/v1/checkout/success", params={"token": token}, headers={"Accept": "application/json"})
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        return dict(r.json())

    def pay(self, email: str, *, secret: str = WHSEC_NEW, key: str | None = None) -> Subscriber:
        """Checkout, Stripe completes the session, the signed webhook lands; the key is not read yet."""
        token, session = self.start_checkout(email, key)
        session = self.stripe.complete_session(session["id"])
        body = fake_stripe.build_event("checkout.session.completed", session)
        r = self.post_webhook(body, fake_stripe.sign_header(body, secret))
        assert r.status_code == 200, r.text
        assert r.json()["applied"] is True and r.json()["event_type"] == "checkout.session.completed"
        return Subscriber(email, token, session, session["subscription"], session["customer"], body)

    def subscribe(self, email: str | None = None, key: str | None = None) -> Subscriber:
        """A paying subscriber whose key has been read once."""
        sub = self.pay(email or f"{uuid.uuid4().hex[:12]}@example.com", key=key)
        shown = _until(lambda: (s := self.status(sub.token))["ready"] and s, "the key after checkout")
        sub.key = shown["api_key"]
        return sub

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def key_status(self, key: str) -> int:
        return self.http.get("/v1/voices", headers=self.auth(key)).status_code


@pytest.fixture(scope="module")
def stripe_server() -> Iterator[Any]:
    server = fake_stripe.FakeStripeServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def billing(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory,
            stripe_server: Any) -> Iterator[BillingPlatform]:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    overrides = {
        "PORT": str(port), "PUBLIC_BASE_URL": base, "APP_BASE_URL": base,
        "BILLING": "on", "STRIPE_SECRET_KEY": STRIPE_KEY, "STRIPE_WEBHOOK_SECRETS": f"{WHSEC_OLD},{WHSEC_NEW}",
        "STRIPE_PRICE_ID": PRICE, "STRIPE_API_BASE": stripe_server.url, "PLAN_CHARACTER_QUOTA": str(QUOTA),
        # Short, so a webhook posted while billing is down answers 503 quickly (Stripe then retries).
        "RPC_TIMEOUT_S": "8",
        # Every checkout of these tests comes from one address; the per-address limit has its own test.
        "CHECKOUT_RATE_PER_MINUTE": "10000",
    }
    with e2e.running_platform(database_url, amqp_url, tmp_path_factory.mktemp("billing"),
                              overrides=overrides) as client:
        assert client.base_url == base
        yield BillingPlatform(client, stripe_server)


# Pages and checkout -----------------------------------------------------------------------------------
def test_signup_page_is_served_with_its_csp(billing: BillingPlatform) -> None:
    r = billing.http.get("/v1/signup")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<form id="signup"' in r.text and 'type="email"' in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    page = billing.http.get("/v1/checkout/already-subscribed")
    assert page.status_code == 200 and "already subscribed" in page.text


def test_checkout_then_webhook_shows_the_key_once(billing: BillingPlatform) -> None:
    email = f"Buyer.{uuid.uuid4().hex[:8]}@Example.com"
    token, session = billing.start_checkout(email)
    assert session["url"].startswith("https://checkout.stripe.test/c/pay/cs_test_")
    assert session["mode"] == "subscription" and session["_price"] == PRICE
    # The official SDK sent our secret key to the fake (and only there).
    assert any(h.get("authorization") == f"Bearer {STRIPE_KEY}" for _, path, h in billing.stripe.requests
               if path == "/v1/checkout/sessions")
    # Before Stripe says paid: a polling client waits; a browser gets the page that polls.
    assert billing.status(token) == {"ready": False}
    assert billing.http.get("/v1/checkout/success", params={"token": token, "format": "json"}).json() \
        == {"ready": False}
    page = billing.http.get("/v1/checkout/success", params={"token": token}, headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "tb_" not in page.text and "Content-Security-Policy" in page.headers

    # Stripe completes the session and signs the event with the newer secret of a rotation.
    paid = billing.stripe.complete_session(session["id"])
    body = fake_stripe.build_event("checkout.session.completed", paid)
    r = billing.post_webhook(body, fake_stripe.sign_header(body, WHSEC_NEW))
    assert r.status_code == 200, r.text
    assert r.json() == {"received": True, "event_id": json.loads(body)["id"],
                        "event_type": "checkout.session.completed", "applied": True}

    shown = _until(lambda: (s := billing.status(token))["ready"] and s, "the key after the webhook")
    key = shown["api_key"]
    assert key.startswith("tb_") and set(shown) == {"ready", "api_key"}
    assert billing.status(token) == {"ready": True, "already_shown": True}
    assert billing.status(token) == {"ready": True, "already_shown": True}
    assert billing.key_status(key) == 200
    usage = billing.http.get("/v1/usage", headers=billing.auth(key)).json()
    assert usage["billing"] == "on" and usage["quota"] == QUOTA and usage["characters_used"] == 0

    # A second checkout with the subscriber's key: already subscribed, no second Stripe session.
    sessions_before = len(billing.stripe.sessions)
    again = billing.http.post("/v1/checkout", json={"email": email.lower()}, headers=billing.auth(key))
    assert again.status_code == 200
    assert again.json() == {"url": f"{billing.client.base_url}/v1/checkout/already-subscribed",
                            "already_subscribed": True}
    assert len(billing.stripe.sessions) == sessions_before

    # Stripe re-sends the same event (also signed with the older secret): nothing changes.
    keys_before = billing.http.get("/v1/keys", headers=billing.client.admin()).json()
    for secret in (WHSEC_NEW, WHSEC_OLD):
        resent = billing.post_webhook(body, fake_stripe.sign_header(body, secret))
        assert resent.status_code == 200 and resent.json()["applied"] is False, resent.text
    assert billing.status(token) == {"ready": True, "already_shown": True}
    assert billing.http.get("/v1/keys", headers=billing.client.admin()).json() == keys_before
    assert billing.key_status(key) == 200


def test_a_stranger_paying_with_a_lapsed_customers_email_gets_a_new_empty_account(
        billing: BillingPlatform, wavs: Any) -> None:
    """The account-takeover path: knowing a customer's email and paying never yields a key to their account. The
    stranger gets a new, empty account; the owner renews with their own key and keeps everything."""
    email = f"victim.{uuid.uuid4().hex[:8]}@example.com"
    victim = billing.subscribe(email)
    voice = billing.client.create_voice(victim.key, wavs.valid_wav(6.0), name="victim voice")
    assert voice.status_code == 201, voice.text
    voice_id = voice.json()["voice_id"]
    r = billing.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": "The victim's own words."},
                          headers=billing.auth(victim.key))
    assert r.status_code == 202, r.text
    victim_job = r.json()["job_id"]
    assert billing.client.wait_job(victim.key, victim_job)["status"] == "ready"
    _until(lambda: _used(billing, victim.key) > 0, "the victim's usage recorded")
    used = _used(billing, victim.key)

    # While subscribed, a stranger's checkout for the email is answered exactly like one for an unknown address.
    for address in (email, f"unknown.{uuid.uuid4().hex[:8]}@example.com"):
        r = billing.http.post("/v1/checkout", json={"email": address})
        assert r.status_code == 200 and r.json()["already_subscribed"] is False, r.text
        assert r.json()["url"].startswith("https://checkout.stripe.test/c/pay/")

    # The subscription lapses: the victim's key is suspended.
    lapsed = billing.subscription(victim)
    lapsed.update(status="canceled", ended_at=int(time.time()), canceled_at=int(time.time()))
    assert billing.webhook("customer.subscription.deleted", lapsed).json()["applied"] is True
    _until(lambda: billing.key_status(victim.key) == 403, "the lapsed account suspended")

    # The attacker knows the email and pays.
    attacker = billing.subscribe(email)
    assert attacker.customer_id != victim.customer_id
    assert billing.stripe.sessions[attacker.session["id"]]["customer_email"] == email
    keys = billing.http.get("/v1/keys", headers=billing.client.admin()).json()
    [attacker_account] = {k["account_id"] for k in keys if k["key_prefix"] == attacker.key[:10]}
    [victim_account] = {k["account_id"] for k in keys if k["key_prefix"] == victim.key[:10]}
    assert attacker_account != victim_account
    # A new, empty account: no usage, no custom voice, none of the victim's jobs.
    assert _used(billing, attacker.key) == 0
    voices = billing.http.get("/v1/voices", headers=billing.auth(attacker.key)).json()
    assert voice_id not in json.dumps(voices)
    assert billing.http.get(f"/v1/voices/{voice_id}", headers=billing.auth(attacker.key)).status_code == 404
    r = billing.http.get(f"/v1/jobs/{victim_job}", headers=billing.auth(attacker.key))
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    # The attacker's payment did not reactivate the victim's account either.
    assert billing.key_status(victim.key) == 403

    # The owner renews with their own (suspended) key: their account, with everything on it, is served again.
    renewal = billing.subscribe(email, key=victim.key)
    assert renewal.customer_id == victim.customer_id
    _until(lambda: billing.key_status(victim.key) == 200, "the renewed account served again")
    # (A new subscription starts a new period; the earlier usage stays on the account's ledger.)
    ledger = billing.client.sql("SELECT coalesce(sum(characters), 0) AS n FROM billing.usage_ledger"
                                " WHERE account_id = $1", victim_account)
    assert ledger[0]["n"] == used
    assert billing.http.get(f"/v1/voices/{voice_id}", headers=billing.auth(victim.key)).status_code == 200
    assert billing.http.get(f"/v1/jobs/{victim_job}", headers=billing.auth(renewal.key)).status_code == 200
    # A key that is not one is refused rather than ignored (it would silently start a new account).
    r = billing.http.post("/v1/checkout", json={"email": email}, headers=billing.auth("tb_not_a_real_key"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text


def test_concurrent_reads_show_the_key_to_one_reader(billing: BillingPlatform) -> None:
    """Two tabs polling at once: exactly one of them gets the plaintext."""
    from concurrent.futures import ThreadPoolExecutor

    sub = billing.pay(f"tabs.{uuid.uuid4().hex[:8]}@example.com")
    url = f"{billing.client.base_url}/v1/checkout/success"

    def poll(_: int) -> dict[str, Any]:
        with httpx.Client(timeout=30) as http:
            return dict(http.get(url, params={"token": sub.token, "format": "json"}).json())

    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while not any(r.get("ready") for r in seen) and time.monotonic() < deadline:
        with ThreadPoolExecutor(8) as pool:
            seen = list(pool.map(poll, range(8)))
    keys = [r["api_key"] for r in seen if "api_key" in r]
    assert len(keys) == 1, seen
    assert all(r == {"ready": True, "already_shown": True} for r in seen if "api_key" not in r and r["ready"])


def test_uncollected_key_expires(billing: BillingPlatform) -> None:
    """A key nobody came for within CHECKOUT_KEY_TTL_S is erased, and the success page says it expired."""
    sub = billing.pay(f"late.{uuid.uuid4().hex[:8]}@example.com")
    _until(lambda: billing.client.sql("SELECT 1 FROM gateway.checkout_keys WHERE checkout_token = $1", sub.token),
           "the gateway minted the checkout's key")
    billing.client.sql("UPDATE gateway.checkout_keys SET created_at = now() - interval '25 hours'"
                          " WHERE checkout_token = $1", sub.token)
    assert billing.status(sub.token) == {"ready": True, "expired": True}
    assert billing.status(sub.token) == {"ready": True, "expired": True}
    row = billing.client.sql("SELECT api_key, shown_at FROM gateway.checkout_keys WHERE checkout_token = $1",
                       sub.token)[0]
    assert row["api_key"] is None and row["shown_at"] is None


def test_checkout_form_post_redirects_and_bad_input_gets_the_error_body(billing: BillingPlatform) -> None:
    email = f"form.{uuid.uuid4().hex[:8]}@example.com"
    r = billing.http.post("/v1/checkout", data={"email": email}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("https://checkout.stripe.test/c/pay/")
    for body, status, code in (({}, 400, "missing_field"), ({"email": "not-an-address"}, 422, "invalid_email")):
        bad = billing.http.post("/v1/checkout", json=body)
        assert bad.status_code == status and bad.json()["error"]["code"] == code, bad.text
    bad = billing.http.post("/v1/checkout", content=b"{nope", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    unknown = billing.http.get("/v1/checkout/success", params={"token": "no-such-token", "format": "json"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "checkout_not_found"
    missing = billing.http.get("/v1/checkout/success")
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_field"


# Webhooks ---------------------------------------------------------------------------------------------
def test_webhook_signatures_are_checked(billing: BillingPlatform) -> None:
    sub = billing.subscribe()
    ended = {**billing.subscription(sub), "status": "canceled", "ended_at": int(time.time())}
    body = fake_stripe.build_event("customer.subscription.deleted", ended)
    tampered = body.replace(b'"livemode": false', b'"livemode": true')
    assert tampered != body
    now = int(time.time())
    invalid, expired = "signature_invalid", "signature_expired"
    refusals = {
        "tampered body": (tampered, fake_stripe.sign_header(body, WHSEC_NEW), invalid),
        "wrong secret": (body, fake_stripe.sign_header(body, f"whsec_{secrets.token_hex(16)}"), invalid),
        # Correctly signed, but outside the tolerance window: a replay or a skewed clock, told apart.
        "stale timestamp": (body, fake_stripe.sign_header(body, WHSEC_NEW, now - 301 - 60), expired),
        "future timestamp": (body, fake_stripe.sign_header(body, WHSEC_OLD, now + 3600), expired),
        "garbage header": (body, "t=abc,v1=00", invalid),
        "no header": (body, None, invalid),
    }
    for what, (payload, signature, code) in refusals.items():
        r = billing.post_webhook(payload, signature)
        assert r.status_code == 400, (what, r.text)
        assert r.json()["error"]["code"] == code and r.json()["error"]["message"], (what, r.text)
    # None of them was applied: the subscription still serves the key.
    assert billing.key_status(sub.key) == 200
    # Unknown event types are acknowledged and change nothing.
    r = billing.webhook("invoice.created", {"id": "in_e2e", "object": "invoice", "customer": sub.customer_id})
    assert r.status_code == 200 and r.json()["applied"] is False and r.json()["event_type"] == "invoice.created"
    # Signed with either secret of the rotation, the same deletion is accepted.
    r = billing.post_webhook(body, fake_stripe.sign_header(body, WHSEC_OLD))
    assert r.status_code == 200 and r.json()["applied"] is True, r.text
    _until(lambda: billing.key_status(sub.key) == 403, "the key refused after the deletion")


def test_period_sync_then_quota_answers_402(billing: BillingPlatform) -> None:
    sub = billing.subscribe()
    # Stripe renews: a new period on the subscription's item, announced by customer.subscription.updated.
    start = int(time.time()) - 3 * 86_400
    item = billing.subscription(sub)["items"]["data"][0]
    item.update(current_period_start=start, current_period_end=start + 30 * 86_400)
    r = billing.webhook("customer.subscription.updated", billing.subscription(sub), created=int(time.time()) + 5)
    assert r.status_code == 200 and r.json()["applied"] is True, r.text
    usage = billing.http.get("/v1/usage", headers=billing.auth(sub.key)).json()
    assert datetime.fromisoformat(usage["period_start"]) == datetime.fromtimestamp(start, UTC)
    assert datetime.fromisoformat(usage["period_end"]) == datetime.fromtimestamp(start + 30 * 86_400, UTC)

    texts = [f"Quota check number {i}, a sentence that is padded until it is exactly one hundred and fifty"
             for i in (1, 2)]
    texts = [t + "." * (150 - len(t)) for t in texts]
    used = 0
    for text in texts:
        r = billing.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": text},
                              headers=billing.auth(sub.key))
        assert r.status_code == 202, r.text
        job = billing.client.wait_job(sub.key, r.json()["job_id"])
        assert job["status"] == "ready", job
        used += len(text)
        _until(lambda expected=used: billing.http.get("/v1/usage", headers=billing.auth(sub.key)).json()[
            "characters_used"] == expected, f"usage {used} recorded")
    usage = billing.http.get("/v1/usage", headers=billing.auth(sub.key)).json()
    assert (usage["characters_used"], usage["quota"], usage["remaining"]) == (QUOTA, QUOTA, 0)
    r = billing.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": "One more."},
                          headers=billing.auth(sub.key))
    assert r.status_code == 402, r.text
    assert r.json()["error"]["code"] == "quota_exceeded" and r.json()["error"]["message"]
    assert r.json()["error"]["details"] == {"remaining": 0}


def _padded(label: str, length: int) -> str:
    """A distinct sentence of exactly `length` characters (distinct texts never share a job or a cache entry)."""
    text = f"Burst request {label}, a sentence padded to a fixed length"
    return text + "." * (length - len(text))


def test_a_burst_of_synthesis_requests_cannot_overrun_the_quota(billing: BillingPlatform) -> None:
    """Requests in flight hold their characters: of a burst worth more than the quota, the ones beyond it are
    refused at once, and the usage recorded once the jobs finish stays within the quota."""
    from concurrent.futures import ThreadPoolExecutor

    sub = billing.subscribe()
    started = datetime.now(UTC)
    url = f"{billing.client.base_url}/v1/synthesize"
    texts = [_padded(f"number {i}", 100) for i in range(8)]  # 800 characters against a quota of 300

    def post(text: str) -> httpx.Response:
        with httpx.Client(timeout=60) as http:
            return http.post(url, json={"voice_id": JOE.voice_id, "text": text}, headers=billing.auth(sub.key))

    with ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(post, texts))
    accepted = [r for r in answers if r.status_code == 202]
    refused = [r for r in answers if r.status_code == 402]
    assert len(accepted) == QUOTA // 100 and len(refused) == len(texts) - QUOTA // 100, \
        [(r.status_code, r.text) for r in answers]
    assert all(r.json()["error"]["code"] == "quota_exceeded" for r in refused)
    for r in accepted:
        assert billing.client.wait_job(sub.key, r.json()["job_id"])["status"] == "ready"
    _until(lambda: _used(billing, sub.key) == QUOTA, "the accepted jobs' usage recorded")
    usage = billing.http.get("/v1/usage", headers=billing.auth(sub.key)).json()
    assert (usage["characters_used"], usage["remaining"]) == (QUOTA, 0)
    # Each finished job's hold became its usage in the same transaction: none is left behind.
    held = billing.client.sql("SELECT count(*) AS n FROM billing.quota_holds WHERE created_at >= $1", started)
    assert held[0]["n"] == 0
    # Nothing is left held or billed beyond the quota: one more character is refused, usage unchanged.
    r = billing.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": "X"},
                          headers=billing.auth(sub.key))
    assert r.status_code == 402 and r.json()["error"]["code"] == "quota_exceeded", r.text
    assert _used(billing, sub.key) == QUOTA


def test_openai_speech_counts_usage_and_meets_the_quota(billing: BillingPlatform) -> None:
    """The OpenAI-compatible route bills like the rest: a streamed answer's characters become usage, and past
    the quota the refusal comes in OpenAI's error shape."""
    sub = billing.subscribe()
    speech = {"model": "tts-1", "voice": "onyx", "input": _padded("spoken the OpenAI way", QUOTA),
              "response_format": "pcm"}
    r = billing.http.post("/v1/audio/speech", json=speech, headers=billing.auth(sub.key))
    assert r.status_code == 200 and len(r.content) > 0, r.text
    _until(lambda: _used(billing, sub.key) == QUOTA, "the streamed job's usage recorded")
    r = billing.http.post("/v1/audio/speech", json={**speech, "input": "One more."}, headers=billing.auth(sub.key))
    assert r.status_code == 402, r.text
    assert r.json()["error"] | {"message": ""} == {"message": "", "type": "insufficient_quota", "param": None,
                                                   "code": "quota_exceeded"}


def test_a_cache_hit_gives_its_hold_back(billing: BillingPlatform) -> None:
    """A repeated text is served from the cache: not billed, and its reservation does not linger."""
    sub = billing.subscribe()
    first, second = _padded("cached", QUOTA // 2), _padded("after the hit", QUOTA // 2)
    r = billing.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": first},
                          headers=billing.auth(sub.key))
    assert r.status_code == 202, r.text
    assert billing.client.wait_job(sub.key, r.json()["job_id"])["status"] == "ready"
    _until(lambda: _used(billing, sub.key) == QUOTA // 2, "the first job's usage recorded")
    hit = billing.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": first},
                            headers=billing.auth(sub.key))
    assert hit.status_code == 200 and hit.headers["x-cache"] == "HIT", hit.text
    # Were the hit's 150 characters still held, 150 used + 150 held + 150 asked would pass the quota.
    r = billing.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": second},
                          headers=billing.auth(sub.key))
    assert r.status_code == 202, r.text
    assert billing.client.wait_job(sub.key, r.json()["job_id"])["status"] == "ready"
    _until(lambda: _used(billing, sub.key) == QUOTA, "the second job's usage recorded")


def test_unpaid_suspends_the_key_and_paying_again_restores_it(billing: BillingPlatform) -> None:
    sub = billing.subscribe()
    now = int(time.time())
    billing.subscription(sub)["status"] = "unpaid"
    r = billing.webhook("customer.subscription.updated", billing.subscription(sub), created=now + 10)
    assert r.status_code == 200 and r.json()["applied"] is True, r.text
    _until(lambda: billing.key_status(sub.key) == 403, "the key refused once unpaid")
    refused = billing.http.get("/v1/voices", headers=billing.auth(sub.key)).json()
    assert refused["error"]["code"] == "account_suspended"
    billing.subscription(sub)["status"] = "active"
    r = billing.webhook("customer.subscription.updated", billing.subscription(sub), created=now + 20)
    assert r.status_code == 200 and r.json()["applied"] is True, r.text
    _until(lambda: billing.key_status(sub.key) == 200, "the key served again once paid")


def test_deleted_then_older_updated_does_not_resurrect(billing: BillingPlatform) -> None:
    sub = billing.subscribe()
    now = int(time.time())
    active_copy = json.loads(json.dumps(billing.subscription(sub)))
    billing.subscription(sub).update(status="canceled", ended_at=now, canceled_at=now)
    r = billing.webhook("customer.subscription.deleted", billing.subscription(sub), created=now + 20)
    assert r.status_code == 200 and r.json()["applied"] is True, r.text
    _until(lambda: billing.key_status(sub.key) == 403, "the key refused after the deletion")
    # Stripe delivers an `updated` it made before the deletion only now.
    r = billing.webhook("customer.subscription.updated", active_copy, created=now + 10)
    assert r.status_code == 200 and r.json()["applied"] is False, r.text
    # Even one dated after the deletion cannot bring a cancelled subscription back.
    r = billing.webhook("customer.subscription.updated", active_copy, created=now + 30)
    assert r.status_code == 200 and r.json()["applied"] is False, r.text
    # Any restore would have been published before the webhook answered; give the gateway time to act on it.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert billing.key_status(sub.key) == 403
        time.sleep(0.1)
    # The account holds no served subscription: its own key is offered a new checkout.
    again = billing.http.post("/v1/checkout", json={"email": sub.email}, headers=billing.auth(sub.key))
    assert again.status_code == 200 and again.json()["already_subscribed"] is False


# Usage exactness --------------------------------------------------------------------------------------
class BusPublisher:
    """Publishes job.ready straight onto the platform's bus, as the dispatcher would."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def publish(self, events: list[tuple[JobReady, str]]) -> None:
        async def _go() -> None:
            bus = await Bus(url=self.env["AMQP_URL"], namespace=self.env["BUS_NAMESPACE"],
                            service="e2e-billing-test").connect()
            try:
                for event, message_id in events:
                    await bus.publish(event, message_id=message_id)
            finally:
                await bus.close()

        asyncio.run(_go())

    def handled(self, message_ids: set[str]) -> int:
        """How many of these message ids billing's consumer has finished with (its inbox)."""
        async def _count() -> int:
            conn = await asyncpg.connect(self.env["DATABASE_URL"])
            try:
                return int(await conn.fetchval(
                    "SELECT count(DISTINCT message_id) FROM billing.inbox WHERE message_id = ANY($1::text[])",
                    list(message_ids)))
            finally:
                await conn.close()

        return asyncio.run(_count())


def _job_ready(account_id: str, characters: int, job_id: str | None = None) -> JobReady:
    return JobReady(job_id=job_id or str(uuid.uuid4()), account_id=account_id, voice_id=JOE.voice_id,
                    backend="embedded", characters=characters, audio_key=f"jobs/{uuid.uuid4()}.wav")


def _used(billing: BillingPlatform, key: dict[str, Any]) -> int:
    r = billing.http.get("/v1/usage", headers=billing.client.auth(key))
    assert r.status_code == 200, r.text
    return int(r.json()["characters_used"])


def test_job_ready_delivered_twice_is_counted_once(billing: BillingPlatform) -> None:
    key = billing.client.new_key(label="usage-twice")
    bus = BusPublisher(billing.client.env)
    job = _job_ready(key["account_id"], 123)
    # The same message twice (the consumer's inbox), and the same job under another message id (the ledger).
    first_id = str(uuid.uuid4())
    events = [(job, first_id), (job, first_id), (job, str(uuid.uuid4()))]
    bus.publish(events)
    ids = {mid for _, mid in events}
    _until(lambda: bus.handled(ids) == len(ids), "billing handled every delivery")
    assert _used(billing, key) == 123


def test_usage_survives_billing_restarting_mid_stream(billing: BillingPlatform) -> None:
    key = billing.client.new_key(label="usage-restart")
    bus = BusPublisher(billing.client.env)
    jobs = [_job_ready(key["account_id"], 10 + i) for i in range(30)]
    first = [(j, str(uuid.uuid4())) for j in jobs[:20]]
    # Killed while the first batch is being consumed: some handled, some in flight, the rest queued.
    bus.publish(first)
    billing.client.platform.kill("billing")
    try:
        later = [(j, str(uuid.uuid4())) for j in jobs[20:]]
        redelivered = [(jobs[0], str(uuid.uuid4())), (jobs[25], str(uuid.uuid4()))]
        bus.publish(later + redelivered)
        # Stripe's retry contract: while billing is down the webhook answers 503, never a 2xx.
        r = billing.webhook("invoice.created", {"id": "in_down", "object": "invoice", "customer": "cus_x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable", r.text
    finally:
        billing.client.platform.start("billing")
    ids = {mid for _, mid in first + later + redelivered}
    _until(lambda: bus.handled(ids) == len(ids), "billing handled every delivery after its restart", timeout=60)
    assert _used(billing, key) == sum(j.characters for j in jobs)


# The pages in a real browser --------------------------------------------------------------------------
def test_browser_signup_form_and_key_page(billing: BillingPlatform, tmp_path: Path) -> None:
    dom = headless_dom(f"{billing.client.base_url}/v1/signup", tmp_path / "signup")
    assert '<form id="signup"' in dom and 'type="email"' in dom and "Continue to payment" in dom

    checkout_keys = lambda: sum(k["label"] == "checkout" for k in billing.http.get(  # noqa: E731
        "/v1/keys", headers=billing.client.admin()).json())
    before = checkout_keys()
    sub = billing.pay(f"browser.{uuid.uuid4().hex[:8]}@example.com")
    _until(lambda: checkout_keys() == before + 1, "the gateway minted the key")
    dom = headless_dom(f"{billing.client.base_url}/v1/checkout/success?token={sub.token}", tmp_path / "success",
                    budget_ms=10_000)
    assert '<div id="key-box">' in dom and "shown only once" in dom, dom[-3000:]
    start = dom.index('<code id="api-key">') + len('<code id="api-key">')
    key = dom[start:dom.index("</code>", start)]
    assert key.startswith("tb_")
    assert billing.key_status(key) == 200
    # Once: the page consumed it; a reload (and any client) is told it was already shown.
    assert billing.status(sub.token) == {"ready": True, "already_shown": True}
    dom = headless_dom(f"{billing.client.base_url}/v1/checkout/success?token={sub.token}", tmp_path / "reload",
                    budget_ms=10_000)
    assert "already shown" in dom and key not in dom


# Secrets ----------------------------------------------------------------------------------------------
def test_no_stripe_secret_reaches_a_log(billing: BillingPlatform) -> None:
    # Exercise every path that handles a secret right here, so the test does not depend on the others.
    sub = billing.subscribe()
    billing.webhook("invoice.created", {"id": "in_log", "object": "invoice"}, secret=WHSEC_OLD)
    billing.post_webhook(b"{}", fake_stripe.sign_header(b"{}", "whsec_wrong"))
    logs = {name: billing.client.platform.log(name) for name in billing.client.platform.processes}
    assert "stripe_event_applied" in logs["billing"] and "http_request" in logs["gateway"]
    for name, text in logs.items():
        for secret in (STRIPE_KEY, WHSEC_OLD, WHSEC_NEW, STRIPE_KEY.removeprefix("sk_test_"),
                       WHSEC_OLD.removeprefix("whsec_"), WHSEC_NEW.removeprefix("whsec_")):
            assert secret not in text, f"a Stripe secret appears in the {name} log"
        assert sub.key not in text, f"an API key appears in the {name} log"
        assert sub.token not in text, f"a checkout token appears in the {name} log"


# BILLING=off, the embedded default ----------------------------------------------------------------------
def test_billing_off_serves_pages_but_no_checkout(client: Any) -> None:
    """The shared default platform: no Stripe behind it, so checkout and webhooks say billing is off."""
    assert client.http.get("/v1/signup").status_code == 200
    r = client.http.post("/v1/checkout", json={"email": "someone@example.com"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "billing_disabled", r.text
    body = b'{"id": "evt_off", "type": "invoice.created"}'
    r = client.http.post("/v1/webhooks/stripe", content=body,
                         headers={"Stripe-Signature": fake_stripe.sign_header(body, WHSEC_NEW)})
    assert r.status_code == 404 and r.json()["error"]["code"] == "billing_disabled", r.text
    key = client.new_key(label="billing-off")
    usage = client.http.get("/v1/usage", headers=client.auth(key)).json()
    assert usage["billing"] == "off" and usage["quota"] is None and usage["characters_used"] == 0
