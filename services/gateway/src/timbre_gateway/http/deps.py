"""Request-scoped dependencies: the gateway context, the caller's key, the admin check."""
from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from timbre_common.callback_tokens import token_matches

from ..adapters.read_models import KnownKey
from ..domain import hash_api_key, looks_like_key
from .errors import ApiError
from .limits import limit_request

bearer = HTTPBearer(auto_error=False, description="An API key (tb_...) or, for admin routes, the admin secret")


@dataclass(frozen=True)
class Caller:
    account_id: str
    key_id: str
    rate_per_minute: int | None
    max_concurrent: int | None


def get_ctx(request: Request) -> Any:
    return request.app.state.ctx


Ctx = Annotated[Any, Depends(get_ctx)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


async def require_key(ctx: Ctx, credentials: Credentials) -> Caller:
    """The account behind `Authorization: Bearer tb_...`; 401 otherwise."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "missing_api_key", "send Authorization: Bearer <api key>", headers=_UNAUTHORIZED)
    token = credentials.credentials
    if not looks_like_key(token):
        raise ApiError(401, "invalid_api_key", "the API key is unknown or revoked", headers=_UNAUTHORIZED)
    # The instance's read model first (dropped on every change of the account's keys); the database otherwise.
    models = getattr(ctx, "read_models", None)
    key_hash = hash_api_key(token)
    known = models.api_key(key_hash) if models is not None else None
    if known is None:
        epoch = models.key_epoch if models is not None else 0
        row = await ctx.accounts.authenticate(token)
        if row is None:
            raise ApiError(401, "invalid_api_key", "the API key is unknown or revoked", headers=_UNAUTHORIZED)
        known = KnownKey(account_id=str(row["account_id"]), key_id=str(row["key_id"]),
                         rate_per_minute=row["rate_per_minute"], max_concurrent=row["max_concurrent"],
                         account_status=row["account_status"], read_at=time.monotonic())
        if models is not None:
            models.remember_key(key_hash, known, epoch)
    if known.account_status != "active":
        raise ApiError(403, "account_suspended", "this account's subscription is not active")
    return Caller(account_id=known.account_id, key_id=known.key_id, rate_per_minute=known.rate_per_minute,
                  max_concurrent=known.max_concurrent)


async def require_admin(ctx: Ctx, credentials: Credentials) -> None:
    """The admin secret, compared in constant time."""
    expected = ctx.settings.admin_secret.get_secret_value().encode()
    given = (credentials.credentials if credentials else "").encode()
    if not expected or not hmac.compare_digest(given, expected):
        raise ApiError(401, "invalid_admin_secret", "wrong or missing admin secret", headers=_UNAUTHORIZED)


async def require_callback_token(request: Request, ctx: Ctx, credentials: Credentials, job_id: str) -> int:
    """A remote GPU worker's token for the path's job and the `attempt` of the query; returns the attempt.

    The token is HMAC(MODAL_CALLBACK_SECRET, job id and attempt), made by the dispatcher for one work order, so
    it completes that attempt of that job only. Checked before a byte of the body is read.
    """
    raw = request.query_params.get("attempt", "")
    attempt = int(raw) if raw.isdigit() and 0 < len(raw) <= 6 else 0
    given = credentials.credentials if credentials else ""
    secret = ctx.settings.modal_callback_secret.get_secret_value()
    if attempt < 1 or not token_matches(secret, job_id, attempt, given):
        raise ApiError(401, "invalid_callback_token", "wrong or missing callback token for this job and attempt",
                       headers=_UNAUTHORIZED)
    return attempt


async def require_key_within_limits(request: Request, ctx: Ctx,
                                    caller: Annotated[Caller, Depends(require_key)]) -> AsyncIterator[Caller]:
    """The caller, counted against its key's rate limit and holding a concurrency slot until the answer."""
    async with limit_request(request, ctx, key_id=caller.key_id, rate_per_minute=caller.rate_per_minute,
                             max_concurrent=caller.max_concurrent):
        yield caller


CallerDep = Annotated[Caller, Depends(require_key_within_limits)]
AdminDep = Annotated[None, Depends(require_admin)]
CallbackAttemptDep = Annotated[int, Depends(require_callback_token)]
