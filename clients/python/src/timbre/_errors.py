"""Exceptions of the SDK: every API error carries the API's stable code, the HTTP status and the request id."""
from __future__ import annotations

from typing import Any


class TimbreError(Exception):
    """Base of every exception the SDK raises."""


class APIConnectionError(TimbreError):
    """The API could not be reached (connection refused, reset, DNS) after every retry."""


class APITimeoutError(APIConnectionError):
    """The API did not answer in time after every retry."""


class APIError(TimbreError):
    """The API answered with an error body `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str, *, request_id: str | None = None,
                 details: dict[str, Any] | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.request_id = request_id
        self.details = details or {}
        self.retry_after = retry_after


class InvalidRequestError(APIError):
    """400 / 422: the request was malformed or a value was refused."""


class AuthenticationError(APIError):
    """401: missing, unknown or revoked API key (or admin secret)."""


class QuotaExceededError(APIError):
    """402: the plan's character quota is used up."""


class PermissionDeniedError(APIError):
    """403: the account is suspended or the call is not allowed."""


class NotFoundError(APIError):
    """404: no such object, or it belongs to another account."""


class ConflictError(APIError):
    """409: a conflicting object or request."""


class GoneError(APIError):
    """410: the object is past its retention."""


class RateLimitError(APIError):
    """429: the key's rate or concurrency limit (after the SDK's own retries)."""


class ServerError(APIError):
    """5xx: the API failed or a backing service was unavailable (after the SDK's own retries)."""


class JobFailedError(TimbreError):
    """A synthesis job ended `failed`; `job.error_code` and `job.error` say why."""

    def __init__(self, job: Any) -> None:
        super().__init__(f"job {job.job_id} failed: {job.error_code or 'failed'}: {job.error or ''}".rstrip(": "))
        self.job = job
        self.code = job.error_code or "job_failed"


class WaitTimeoutError(TimbreError):
    """A job was still pending when the wait ran out."""

    def __init__(self, job: Any, timeout: float) -> None:
        super().__init__(f"job {job.job_id} still {job.status} after {timeout:g} s")
        self.job = job


class WebhookVerificationError(TimbreError):
    """A webhook's Timbre-Signature does not match its body and secret, or is too old."""


_BY_STATUS: dict[int, type[APIError]] = {400: InvalidRequestError, 401: AuthenticationError, 402: QuotaExceededError,
                                         403: PermissionDeniedError, 404: NotFoundError, 409: ConflictError,
                                         410: GoneError, 422: InvalidRequestError, 429: RateLimitError}


def error_for(status: int, body: Any, *, request_id: str | None, retry_after: float | None) -> APIError:
    """The exception for an error answer (any body: JSON error, or not)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or "error")
        message = str(error.get("message") or "")
        details = error.get("details") if isinstance(error.get("details"), dict) else None
    else:
        code, message, details = "http_error", f"HTTP {status}", None
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return cls(status, code, message, request_id=request_id, details=details, retry_after=retry_after)
