"""One error body everywhere: {"error": {"code": "...", "message": "..."}} with a stable code."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from timbre_common.availability import unavailable_dependency
from timbre_common.logging import get_logger
from timbre_common.messaging import BrokerUnavailable, RemoteError, RpcTimeout

log = get_logger(__name__)


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.details = details


MAX_MESSAGE_CHARS = 500


def error_response(status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                   details: dict[str, Any] | None = None) -> JSONResponse:
    # Messages may quote what the client sent (an id, a field); a hostile value is not echoed back whole.
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited"}


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    missing = [".".join(str(p) for p in e["loc"][1:]) for e in errors if e.get("type") == "missing"]
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "invalid_json", "the request body is not valid JSON")
    if any(e.get("type") in ("model_attributes_type", "dict_type") and len(e["loc"]) <= 1 for e in errors):
        return error_response(400, "invalid_body", "the request body must be a JSON object")
    if missing:
        return error_response(400, "missing_field", f"missing required field(s): {', '.join(missing)}",
                              details={"fields": missing})
    fields = [{"field": ".".join(str(p) for p in e["loc"][1:]), "problem": e.get("msg", "")} for e in errors]
    return error_response(422, "invalid_request", "; ".join(f"{f['field']}: {f['problem']}" for f in fields),
                          details={"fields": fields})


RETRY_AFTER_S = 5


def unavailable_response(dependency: str, exc: BaseException) -> JSONResponse:
    """503 with Retry-After: a dependency is down or restarting; the request itself was fine."""
    log.warning("dependency_unavailable", dependency=dependency, error=f"{type(exc).__name__}: {exc}"[:300])
    return error_response(503, "service_unavailable", f"{dependency} is unavailable right now; retry shortly",
                          headers={"Retry-After": str(RETRY_AFTER_S)}, details={"dependency": dependency})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers, details=exc.details)

    @app.exception_handler(RemoteError)
    async def _remote_error(_: Request, exc: RemoteError) -> JSONResponse:
        if exc.status == 503:
            return unavailable_response(str((exc.details or {}).get("dependency") or "a backing service"), exc)
        status = exc.status if 400 <= exc.status < 600 else 502
        return error_response(status, exc.code, exc.message)

    @app.exception_handler(BrokerUnavailable)
    async def _broker_down(_: Request, exc: BrokerUnavailable) -> JSONResponse:
        return unavailable_response("broker", exc)

    @app.exception_handler(RpcTimeout)
    async def _timeout(_: Request, exc: RpcTimeout) -> JSONResponse:
        log.error("rpc_timeout", error=str(exc))
        return error_response(503, "service_unavailable", "a backing service did not answer in time; retry shortly",
                              headers={"Retry-After": str(RETRY_AFTER_S)}, details={"dependency": "service"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        # Only input nests this deeply (a JSON body parsed by hand, a validator walking it): the client's fault.
        log.warning("request_nested_too_deeply")
        return error_response(400, "invalid_body", "the request body is nested too deeply")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        dependency = unavailable_dependency(exc)
        if dependency is not None:  # the broker's channel gone, the database restarting: not our bug
            return unavailable_response(dependency, exc)
        log.exception("unhandled_error", error=type(exc).__name__)
        return error_response(500, "internal_error", "an unexpected error occurred")


def document_error_body(app: FastAPI) -> None:
    """Make the OpenAPI document show our error body where FastAPI would show its own validation error."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model_schema in (("ErrorBody", ErrorBody), ("ErrorDetail", ErrorDetail)):
            if name not in components:
                components.update(model_schema.model_json_schema(ref_template="#/components/schemas/{model}")
                                  .pop("$defs", {}))
                components[name] = model_schema.model_json_schema(ref_template="#/components/schemas/{model}")
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                answer = operation.get("responses", {}).get("422")
                content = (answer or {}).get("content", {}).get("application/json", {})
                if content.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                    answer.update({"description": "Invalid value; code: invalid_request",
                                   "x-error-codes": ["invalid_request"]},
                                  content={"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# For the OpenAPI document: what each error status looks like.
def error_responses(*statuses: int, codes: dict[int, list[str]] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these error statuses; `codes` names the stable error codes each can carry."""
    descriptions = {400: "Missing or malformed field", 401: "Missing or wrong credentials",
                    402: "Plan quota used up", 403: "Not allowed", 404: "Not found, or owned by another key",
                    409: "Conflict", 410: "Gone: past its retention", 413: "Body too large", 422: "Invalid value",
                    429: "Rate or concurrency limit",
                    500: "Internal error", 503: "A backing service is unavailable"}
    retry = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}
    headers = {409: retry, 503: retry, 429: retry | {
        "X-RateLimit-Limit": {"description": "Requests per minute allowed for this key", "schema": {"type": "integer"}},
        "X-RateLimit-Remaining": {"description": "Requests left in the window", "schema": {"type": "integer"}}}}
    auto = {401: ["missing_api_key", "invalid_api_key"], 429: ["rate_limited", "too_many_concurrent_requests"],
            503: ["service_unavailable"]}
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        named = (codes or {}).get(s) or auto.get(s)
        description = descriptions.get(s, "Error") + (f"; code: {', '.join(named)}" if named else "")
        out[s] = {"model": ErrorBody, "description": description, **({"x-error-codes": named} if named else {}),
                  **({"headers": headers[s]} if s in headers else {})}
    return out
