"""A small stateful fake of the Stripe API (customers, Checkout Sessions, subscriptions), webhook signing."""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from timbre_common.testing import LoopbackServer

_KEY_RE = re.compile(r"\[([^\]]*)\]")
MONTH_S = 30 * 86_400


def decode_form(body: bytes) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][0][c]=v`) into nested dicts; numeric keys become lists."""
    root: dict[str, Any] = {}
    for raw_key, value in parse_qsl(body.decode(), keep_blank_values=True):
        head = raw_key.split("[", 1)[0]
        parts = [head, *_KEY_RE.findall(raw_key[len(head):])]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def listify(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: listify(v) for k, v in node.items()}
            if node and all(k.isdigit() for k in node):
                return [node[k] for k in sorted(node, key=int)]
        return node

    return listify(root)


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    err: dict[str, Any] = {"type": "invalid_request_error", "message": message}
    if param:
        err["param"] = param
    if code:
        err["code"] = code
    return JSONResponse({"error": err}, status_code=status)


def _missing_subscription(subscription_id: str) -> JSONResponse:
    return _error(404, f"No such subscription: '{subscription_id}'", param="id", code="resource_missing")


def _list(url: str, data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "url": url, "has_more": False, "data": data}


@dataclass
class FakeStripeState:
    """Everything the fake holds; tests read and change it directly."""

    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self.ids):06d}"

    def create_customer(self, email: str | None) -> dict[str, Any]:
        cid = self.new_id("cus")
        self.customers[cid] = {"id": cid, "object": "customer", "email": email, "created": int(time.time()),
                               "livemode": False, "metadata": {}}
        return self.customers[cid]

    def create_subscription(self, customer_id: str, price: str, *, status: str = "active",
                            period_start: int | None = None, period_s: int = MONTH_S) -> dict[str, Any]:
        start = period_start or int(time.time())
        sid = self.new_id("sub")
        item = {"id": self.new_id("si"), "object": "subscription_item",
                "price": {"id": price, "object": "price"},
                "quantity": 1, "current_period_start": start, "current_period_end": start + period_s}
        self.subscriptions[sid] = {
            "id": sid, "object": "subscription", "customer": customer_id, "status": status,
            "created": start, "livemode": False, "metadata": {}, "cancel_at_period_end": False,
            "canceled_at": None, "ended_at": None,
            "items": {"object": "list", "data": [item], "has_more": False,
                      "url": f"/v1/subscription_items?subscription={sid}"},
        }
        return self.subscriptions[sid]

    def complete_session(self, session_id: str, *, period_start: int | None = None) -> dict[str, Any]:
        """What Stripe does when the customer pays: customer, subscription, session complete."""
        session = self.sessions[session_id]
        customer_id = session.get("customer") or self.create_customer(session.get("customer_email"))["id"]
        sub = self.create_subscription(customer_id, session["_price"], period_start=period_start)
        session.update(status="complete", payment_status="paid", customer=customer_id, subscription=sub["id"],
                       customer_details={"email": self.customers[customer_id]["email"]})
        return session


def build_app(state: FakeStripeState) -> FastAPI:
    """The fake's HTTP API, Stripe-shaped."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        auth = request.headers.get("authorization", "")
        state.requests.append((request.method, request.url.path, dict(request.headers)))
        if not auth.startswith("Bearer sk_"):
            err = {"type": "invalid_request_error", "message": "Invalid API Key provided"}
            return JSONResponse({"error": err}, status_code=401)
        return await call_next(request)

    @app.post("/v1/customers")
    async def create_customer(request: Request) -> Any:
        form = decode_form(await request.body())
        customer = state.create_customer(form.get("email"))
        customer["metadata"] = form.get("metadata", {})
        return customer

    @app.get("/v1/customers")
    async def list_customers(email: str | None = None, limit: int = 10) -> Any:
        data = [c for c in state.customers.values() if email is None or c["email"] == email]
        return _list("/v1/customers", data[:limit])

    @app.get("/v1/customers/{customer_id}")
    async def get_customer(customer_id: str) -> Any:
        if customer_id not in state.customers:
            return _error(404, f"No such customer: '{customer_id}'", param="id", code="resource_missing")
        return state.customers[customer_id]

    @app.post("/v1/checkout/sessions")
    async def create_session(request: Request) -> Any:
        form = decode_form(await request.body())
        for required in ("mode", "success_url"):
            if not form.get(required):
                return _error(400, f"Missing required param: {required}.", param=required)
        items = form.get("line_items") or []
        if not items or not items[0].get("price"):
            return _error(400, "Missing required param: line_items[0][price].", param="line_items[0][price]")
        if form.get("customer") and form.get("customer_email"):
            return _error(400, "You may only specify one of these parameters: customer, customer_email.",
                          param="customer")
        if form.get("customer") and form["customer"] not in state.customers:
            return _error(400, f"No such customer: '{form['customer']}'", param="customer",
                          code="resource_missing")
        expires_at = int(form["expires_at"]) if form.get("expires_at") else int(time.time()) + 86_400
        # Stripe: a session expires 30 minutes to 24 hours after it is created.
        if not 1800 <= expires_at - int(time.time()) <= 86_400:
            return _error(400, "The `expires_at` timestamp must be between 30 minutes and 24 hours from now.",
                          param="expires_at")
        key = request.headers.get("idempotency-key")
        if key:
            for existing in state.sessions.values():
                if existing["_idempotency_key"] == key:
                    return existing
        sid = state.new_id("cs_test")
        state.sessions[sid] = {
            "id": sid, "object": "checkout.session", "mode": form["mode"], "status": "open",
            "payment_status": "unpaid", "url": f"https://checkout.stripe.test/c/pay/{sid}",
            "success_url": form["success_url"], "cancel_url": form.get("cancel_url"),
            "customer": form.get("customer"), "customer_email": form.get("customer_email"),
            "client_reference_id": form.get("client_reference_id"), "metadata": form.get("metadata", {}),
            "subscription": None, "created": int(time.time()), "expires_at": expires_at, "livemode": False,
            "_price": items[0]["price"], "_idempotency_key": key,
        }
        return state.sessions[sid]

    @app.get("/v1/checkout/sessions/{session_id}")
    async def get_session(session_id: str) -> Any:
        if session_id not in state.sessions:
            return _error(404, f"No such checkout.session: '{session_id}'", param="session",
                          code="resource_missing")
        return state.sessions[session_id]

    @app.get("/v1/subscriptions")
    async def list_subscriptions(
        customer: str | None = None, status: str | None = None, limit: int = 10
    ) -> Any:
        data = [
            s for s in state.subscriptions.values()
            if (customer is None or s["customer"] == customer)
            and (status == "all" or (status is None and s["status"] != "canceled") or s["status"] == status)
        ]
        return _list("/v1/subscriptions", data[:limit])

    @app.get("/v1/subscriptions/{subscription_id}")
    async def get_subscription(subscription_id: str) -> Any:
        if subscription_id not in state.subscriptions:
            return _missing_subscription(subscription_id)
        return state.subscriptions[subscription_id]

    @app.post("/v1/subscriptions/{subscription_id}")
    async def update_subscription(subscription_id: str, request: Request) -> Any:
        if subscription_id not in state.subscriptions:
            return _missing_subscription(subscription_id)
        form = decode_form(await request.body())
        sub = state.subscriptions[subscription_id]
        for key in ("status", "cancel_at_period_end"):
            if key in form:
                sub[key] = form[key] if key == "status" else form[key] == "true"
        sub["metadata"].update(form.get("metadata", {}))
        return sub

    return app


class FakeStripeServer(LoopbackServer):
    """The fake Stripe API on loopback; `state` is shared with the tests."""

    def __init__(self) -> None:
        self.state = FakeStripeState()
        super().__init__(build_app(self.state))


def sign_header(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header: t={ts},v1=hex(HMAC_SHA256(secret, f"{ts}.{payload}"))."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


_event_ids = itertools.count(1)


def build_event(
    event_type: str, obj: dict[str, Any], *, created: int | None = None, event_id: str | None = None
) -> bytes:
    """A Stripe event body around `obj` (private `_` keys of the fake removed)."""
    clean = {k: v for k, v in obj.items() if not k.startswith("_")}
    body = {
        "id": event_id or f"evt_fake{next(_event_ids):06d}{int(time.time() * 1000) % 1_000_000:06d}",
        "object": "event",
        "api_version": "2025-10-29.clover",
        "created": int(time.time()) if created is None else created,
        "type": event_type,
        "livemode": False,
        "pending_webhooks": 1,
        "data": {"object": clean},
    }
    return json.dumps(body).encode()
