"""Structured JSON logging with the correlation id of the request in every line."""
from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO

import structlog

from . import tracing

correlation_id_var: ContextVar[str | None] = ContextVar("correlation_id", default=None)

# Keys whose values never reach a log line, whatever the caller passes.
_SECRET_KEYS = ("secret", "password", "api_key", "authorization", "token", "signature", "wav_b64")


def _add_correlation_id(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    cid = correlation_id_var.get()
    if cid and "correlation_id" not in event:
        event["correlation_id"] = cid
    return event


def _add_trace_id(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """The active span's trace id, when tracing is on: a log line leads to its trace and back."""
    if tracing.enabled() and "trace_id" not in event and (trace_id := tracing.current_trace_id()):
        event["trace_id"] = trace_id
    return event


# Secrets that can hide inside text (a message, a URL, a library's repr of a payload): signed-URL signatures,
# S3 credentials in query strings, API keys, Stripe secrets.
_SECRET_TEXT = re.compile(
    r"(?i)((?:signature|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s'\"]+"
    r"|\b(tb_)[A-Za-z0-9_-]{16,}"
    r"|\b((?:sk|rk|whsec)_(?:live|test)?_?)[A-Za-z0-9]{8,}")


# A URL's query: where a presigned URL keeps its signature and credentials.
_URL_QUERY = re.compile(r"(https?://[^\s?#'\"<>]+)\?[^\s'\"<>]*")


def scrub_urls(text: str, limit: int = 2000) -> str:
    """Text fit to keep and show a client (a job's error): every URL's query cut, the length bounded."""
    return _URL_QUERY.sub(r"\1?[redacted]", text)[:limit]


def _scrub(text: str) -> str:
    return _SECRET_TEXT.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "[redacted]", text)


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event.items()):
        if any(word in key.lower() for word in _SECRET_KEYS):
            event[key] = "[redacted]"
        elif isinstance(value, str):
            event[key] = _scrub(value)
    return event


def configure_logging(service: str, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to one JSON line per event on `stream` (stdout by default)."""
    stream = stream or sys.stdout
    shared = [
        structlog.contextvars.merge_contextvars,
        _add_correlation_id,
        _add_trace_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Redaction runs last, on the finished text: tracebacks and library messages included.
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, _redact, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info, _redact, structlog.processors.JSONRenderer()],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(level.upper())


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger; cheap, safe at import."""
    return structlog.get_logger(name)


@contextmanager
def correlation(cid: str | None) -> Iterator[None]:
    """Bind a correlation id for the duration of a block (a request or a message)."""
    token = correlation_id_var.set(cid)
    try:
        yield
    finally:
        correlation_id_var.reset(token)
