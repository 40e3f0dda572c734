"""The hosted billing flow of seeds/002: signup page, Stripe Checkout, the one-time key page, Stripe webhooks.

Billing owns Stripe and the subscription state (RPC); the gateway mints the API key when billing asks and
holds its plaintext for one read (erased unread after CHECKOUT_KEY_TTL_S), so the key never crosses the bus.
The pages (http/pages.py) are presentation only and are served with their CSP.
"""
from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ValidationError

from timbre_common.contracts.billing import (
    CheckoutStarted,
    CheckoutStatus,
    GetCheckoutStatus,
    HandleStripeWebhook,
    StartCheckout,
    WebhookOutcome,
)
from timbre_common.logging import get_logger

from ..adapters.limits import retry_after
from ..domain import looks_like_key
from .deps import Credentials, Ctx
from .errors import ApiError, error_responses
from .pages import already_subscribed_page, security_headers, signup_page, success_page

log = get_logger(__name__)
router = APIRouter(prefix="/v1", tags=["billing"])

MAX_TOKEN_CHARS = 200
NO_STORE = {"Cache-Control": "no-store"}


class CheckoutRequest(BaseModel):
    email: str


class CheckoutOut(BaseModel):
    url: str
    already_subscribed: bool = False


class CheckoutStatusOut(BaseModel):
    """`ready: false` until payment is confirmed and the key minted; the key once; then `already_shown`,
    or `expired` when nobody collected it within CHECKOUT_KEY_TTL_S."""

    ready: bool
    api_key: str | None = None
    already_shown: bool | None = None
    expired: bool | None = None


class WebhookReceived(BaseModel):
    received: bool = True
    event_id: str
    event_type: str
    applied: bool


def _html(page: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(page, status_code=status, headers=security_headers())


def _wants_json(request: Request, fmt: str | None) -> bool:
    return fmt == "json" or "application/json" in request.headers.get("accept", "").lower()


async def _checkout_email(request: Request) -> tuple[str, bool]:
    """The email of a JSON body (the page's fetch) or of a plain form post (no script); and which it was."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    if content_type == "application/x-www-form-urlencoded":
        email = (parse_qs(raw.decode("utf-8", "replace")).get("email") or [""])[0]
        if not email.strip():
            raise ApiError(400, "missing_field", "email is required", details={"fields": ["email"]})
        return email, True
    try:
        payload = json.loads(raw or b"null")
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_body", "the request body must be a JSON object")
    try:
        body = CheckoutRequest.model_validate(payload)
    except ValidationError:
        raise ApiError(400, "missing_field", "email is required", details={"fields": ["email"]}) from None
    if not body.email.strip():
        raise ApiError(400, "missing_field", "email is required", details={"fields": ["email"]})
    return body.email, False


@router.get("/signup", response_class=HTMLResponse, summary="The signup form")
async def signup() -> HTMLResponse:
    return _html(signup_page())


CHECKOUT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": CheckoutRequest.model_json_schema()},
    "application/x-www-form-urlencoded": {"schema": CheckoutRequest.model_json_schema()}}}}


async def _limit_checkout(request: Request, ctx: Any) -> None:
    """CHECKOUT_RATE_PER_MINUTE per client address: each checkout costs Stripe calls and a row."""
    limiter = getattr(ctx, "limiter", None)
    if limiter is None:
        return
    address = request.client.host if request.client else "unknown"
    decision = await limiter.hit(f"checkout-ip:{address}", ctx.settings.checkout_rate_per_minute)
    if not decision.allowed:
        raise ApiError(429, "rate_limited", f"more than {decision.limit} checkouts per minute from this address",
                       headers={"Retry-After": retry_after(decision.retry_after_s)})


async def _renewing_account(ctx: Any, credentials: Credentials) -> str | None:
    """The account an authenticated checkout renews; None without a key. A suspended account's key is accepted
    here (renewing is how it is served again); an unknown or revoked one is refused, never ignored."""
    if credentials is None:
        return None
    token = credentials.credentials
    row = await ctx.accounts.authenticate(token) if looks_like_key(token) else None
    if row is None:
        raise ApiError(401, "invalid_api_key", "the API key is unknown or revoked",
                       headers={"WWW-Authenticate": "Bearer"})
    return str(row["account_id"])


@router.post("/checkout", response_model=CheckoutOut, openapi_extra=CHECKOUT_BODY,
             summary="Start a Stripe Checkout: a new account, or with an API key a renewal of its account",
             description="Without `Authorization` the checkout always creates a new account, and the answer is the "
                         "same whatever the email: an email never selects an existing account. To renew or "
                         "re-subscribe an account send its key (`Authorization: Bearer tb_...`, a suspended "
                         "account's key included); an account still subscribed is answered "
                         "`already_subscribed: true` with the already-subscribed page.",
             responses={303: {"description": "A form post: redirected to the returned URL"},
                        **error_responses(400, 401, 404, 422, 429, 503)})
async def checkout(request: Request, ctx: Ctx, credentials: Credentials) -> Response:
    await _limit_checkout(request, ctx)
    account_id = await _renewing_account(ctx, credentials)
    email, from_form = await _checkout_email(request)
    started, _ = await ctx.bus.call("billing", StartCheckout(email=email, account_id=account_id),
                                    expect=CheckoutStarted)
    if from_form:
        return RedirectResponse(started.url, status_code=303, headers=NO_STORE)
    out = CheckoutOut(url=started.url, already_subscribed=started.already_subscribed)
    return JSONResponse(out.model_dump(), headers=NO_STORE)


@router.get("/checkout/success", response_model=CheckoutStatusOut, response_model_exclude_none=True,
            summary="After payment: the API key, once (HTML for a browser, JSON for a polling client)",
            responses={200: {"content": {"text/html": {}}}, **error_responses(400, 404, 503)})
async def checkout_success(request: Request, ctx: Ctx,
                           token: str = Query(min_length=1, max_length=MAX_TOKEN_CHARS),
                           format: str | None = None) -> Response:  # noqa: A002 - the public query name
    if not _wants_json(request, format):
        # The page itself holds no secret: its script polls the JSON form of this route.
        return _html(success_page(token))
    status, _ = await ctx.bus.call("billing", GetCheckoutStatus(token=token), expect=CheckoutStatus)
    # Billing's `ready` means paid; the key exists once the gateway has handled the provisioning event.
    # Only a key on the account billing says this checkout paid for: a provisioning request that named another
    # account under this token (it could only come from inside) hands out nothing.
    taken = (await ctx.accounts.take_checkout_key(token, max_age_s=ctx.settings.checkout_key_ttl_s,
                                                  account_id=status.account_id)
             if status.ready else None)
    if taken is None:
        out = CheckoutStatusOut(ready=False)
    elif taken["api_key"]:
        log.info("checkout_key_shown", account=str(taken["account_id"]))
        out = CheckoutStatusOut(ready=True, api_key=taken["api_key"])
    elif taken["shown_at"] is None:
        out = CheckoutStatusOut(ready=True, expired=True)
    else:
        out = CheckoutStatusOut(ready=True, already_shown=True)
    return JSONResponse(out.model_dump(exclude_none=True), headers=NO_STORE)


@router.get("/checkout/already-subscribed", response_class=HTMLResponse,
            summary="Shown instead of a second checkout for an active subscriber")
async def already_subscribed() -> HTMLResponse:
    return _html(already_subscribed_page())


@router.post("/webhooks/stripe", response_model=WebhookReceived,
             summary="Stripe webhooks (Stripe-Signature); each event applied once, unknown types acknowledged",
             responses=error_responses(400, 404, 413, 503))
async def stripe_webhook(request: Request, ctx: Ctx) -> Any:
    signature = request.headers.get("stripe-signature", "")
    if not signature:
        raise ApiError(400, "signature_invalid", "the Stripe-Signature header is missing")
    # The exact bytes: the signature covers them, so nothing may parse and re-serialize the body first. Their
    # size is capped (MAX_WEBHOOK_BODY_BYTES) by the body-limit middleware while they arrive.
    payload = await request.body()
    # A 400 (bad signature) comes back as billing's error; a 5xx (billing or Stripe down) makes Stripe retry.
    outcome, _ = await ctx.bus.call("billing", HandleStripeWebhook(signature=signature), body=payload,
                                    expect=WebhookOutcome)
    return WebhookReceived(event_id=outcome.event_id, event_type=outcome.event_type, applied=outcome.applied)
