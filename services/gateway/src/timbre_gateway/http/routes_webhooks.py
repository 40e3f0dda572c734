"""Client webhooks: register HTTPS endpoints for events, rotate their secrets, see their deliveries."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from timbre_common.contracts.webhooks import WEBHOOK_EVENTS
from timbre_common.ids import is_canonical_uuid
from timbre_common.logging import get_logger

from ..webhooks import domain
from ..webhooks.targets import TargetRefused, check_target, parse_policy, system_resolver
from .deps import CallerDep, Ctx
from .errors import ApiError, error_responses
from .schemas import Text

log = get_logger(__name__)
router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

WebhookEvent = Literal[WEBHOOK_EVENTS]  # type: ignore[valid-type]
URL_CODES = ["invalid_webhook_url", "webhook_target_refused", "webhook_target_unresolvable"]


class CreateWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: Text = Field(max_length=2048, description="An https URL on a public address")
    events: list[WebhookEvent] = Field(min_length=1, max_length=len(WEBHOOK_EVENTS))
    description: Text | None = Field(default=None, max_length=500)


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_s: float = Field(default=24 * 3600, ge=0, le=7 * 24 * 3600,
                           description="How long the old secret keeps signing beside the new one")


class WebhookOut(BaseModel):
    webhook_id: str
    url: str
    events: list[str]
    description: str | None = None
    created_at: datetime
    previous_secret_expires_at: datetime | None = None


class WebhookCreated(WebhookOut):
    secret: str = Field(description="Signs every delivery (Timbre-Signature); shown at creation and rotation only")


class DeliveryAttempt(BaseModel):
    attempt: int
    started_at: datetime
    duration_ms: int
    status_code: int | None = None
    error: str | None = None
    response: str | None = Field(default=None, description="The first KiB of the endpoint's answer")


class DeliveryOut(BaseModel):
    delivery_id: str
    event_id: str
    event_type: str
    status: Literal["pending", "delivered", "parked"]
    attempts: int
    next_attempt_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None
    created_at: datetime
    completed_at: datetime | None = None
    attempt_log: list[DeliveryAttempt]


def _out(row: Any, model: type[WebhookOut] = WebhookOut, **extra: Any) -> Any:
    lapsed = row["previous_secret_expires_at"]
    return model(webhook_id=str(row["webhook_id"]), url=row["url"], events=list(row["events"]),
                 description=row["description"], created_at=row["created_at"],
                 previous_secret_expires_at=lapsed, **extra)


async def checked_url(ctx: Any, url: str) -> str:
    """The URL if webhooks may go there (public address, https), else 422 with why."""
    try:
        await check_target(url, parse_policy(ctx.settings.webhook_allow_private),
                           ctx.extras.get("webhook_resolver", system_resolver))
    except TargetRefused as exc:
        raise ApiError(422, exc.code, exc.message) from None
    return url


async def endpoint_for_request(ctx: Any, account_id: str, url: str) -> str:
    """The registered endpoint a synthesis request's webhook_url names; 422 when the account has none there."""
    row = await ctx.webhooks.endpoint_by_url(account_id, url)
    if row is None:
        raise ApiError(422, "webhook_not_registered",
                       "webhook_url must be an endpoint registered with POST /v1/webhooks")
    return str(row["webhook_id"])


async def _endpoint(ctx: Any, account_id: str, webhook_id: str) -> Any:
    row = await ctx.webhooks.get_endpoint(account_id, webhook_id) if is_canonical_uuid(webhook_id) else None
    if row is None:
        raise ApiError(404, "webhook_not_found", "no such webhook")
    return row


@router.post("", status_code=201, response_model=WebhookCreated, summary="Register an endpoint for events",
             responses=error_responses(400, 401, 409, 422, 429, codes={
                 400: ["invalid_json", "invalid_body", "missing_field"], 409: ["webhook_exists"],
                 422: ["invalid_request", "too_many_webhooks", *URL_CODES]}))
async def create_webhook(ctx: Ctx, caller: CallerDep, body: CreateWebhook) -> WebhookCreated:
    url = await checked_url(ctx, body.url.strip())
    if await ctx.webhooks.count_endpoints(caller.account_id) >= ctx.settings.webhook_max_endpoints:
        raise ApiError(422, "too_many_webhooks",
                       f"an account has at most {ctx.settings.webhook_max_endpoints} webhook endpoints")
    secret = domain.mint_secret()
    row = await ctx.webhooks.create_endpoint(account_id=caller.account_id, url=url,
                                             events=sorted(set(body.events)), description=body.description,
                                             secret=secret)
    if row is None:
        raise ApiError(409, "webhook_exists", "this account already has an endpoint at this URL")
    log.info("webhook_registered", webhook_id=str(row["webhook_id"]), events=list(row["events"]))
    return _out(row, WebhookCreated, secret=secret)


@router.get("", response_model=list[WebhookOut], summary="The account's endpoints",
            responses=error_responses(401, 429))
async def list_webhooks(ctx: Ctx, caller: CallerDep) -> list[WebhookOut]:
    return [_out(r) for r in await ctx.webhooks.list_endpoints(caller.account_id)]


@router.get("/{webhook_id}", response_model=WebhookOut, summary="One endpoint",
            responses=error_responses(401, 404, 429, codes={404: ["webhook_not_found"]}))
async def get_webhook(ctx: Ctx, caller: CallerDep, webhook_id: str) -> WebhookOut:
    return _out(await _endpoint(ctx, caller.account_id, webhook_id))


@router.delete("/{webhook_id}", status_code=204, summary="Remove an endpoint (its pending deliveries are dropped)",
               responses=error_responses(401, 404, 429, codes={404: ["webhook_not_found"]}))
async def delete_webhook(ctx: Ctx, caller: CallerDep, webhook_id: str) -> Response:
    if not is_canonical_uuid(webhook_id) or not await ctx.webhooks.delete_endpoint(caller.account_id, webhook_id):
        raise ApiError(404, "webhook_not_found", "no such webhook")
    log.info("webhook_removed", webhook_id=webhook_id)
    return Response(status_code=204)


@router.post("/{webhook_id}/rotate", response_model=WebhookCreated,
             summary="A new signing secret; the old one keeps signing (a second v1=) for grace_s seconds",
             responses=error_responses(400, 401, 404, 422, 429, codes={404: ["webhook_not_found"]}))
async def rotate_webhook_secret(ctx: Ctx, caller: CallerDep, webhook_id: str,
                                body: RotateSecret | None = None) -> WebhookCreated:
    await _endpoint(ctx, caller.account_id, webhook_id)
    secret = domain.mint_secret()
    row = await ctx.webhooks.rotate_secret(caller.account_id, webhook_id, secret, (body or RotateSecret()).grace_s)
    if row is None:
        raise ApiError(404, "webhook_not_found", "no such webhook")
    log.info("webhook_secret_rotated", webhook_id=webhook_id)
    return _out(row, WebhookCreated, secret=secret)


@router.get("/{webhook_id}/deliveries", response_model=list[DeliveryOut],
            summary="The endpoint's latest deliveries, newest first, with every attempt and its answer",
            responses=error_responses(401, 404, 429, codes={404: ["webhook_not_found"]}))
async def list_deliveries(ctx: Ctx, caller: CallerDep, webhook_id: str,
                          limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[DeliveryOut]:
    await _endpoint(ctx, caller.account_id, webhook_id)
    rows = await ctx.webhooks.list_deliveries(caller.account_id, webhook_id, limit=limit)
    out = []
    for r in rows:
        attempts = r["attempt_log"]
        if isinstance(attempts, str):
            attempts = json.loads(attempts)
        out.append(DeliveryOut(delivery_id=str(r["delivery_id"]), event_id=r["event_id"], event_type=r["event_type"],
                               status=r["status"], attempts=r["attempts"],
                               next_attempt_at=r["next_attempt_at"] if r["status"] == "pending" else None,
                               last_status=r["last_status"], last_error=r["last_error"], created_at=r["created_at"],
                               completed_at=r["completed_at"], attempt_log=attempts))
    return out
