"""OpenTelemetry traces from the HTTP request through every RPC and event to the worker and back.

Off unless configured, and then nearly free: no OpenTelemetry module is even imported, `span()` is an empty
context and nothing is added to messages. Configured from the environment by `configure(service)`:

- `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): export over OTLP/HTTP to a
  collector (batched);
- `OTEL_TRACES_EXPORTER`: `otlp` (the default when an endpoint is set), `none`, `console`, or `file`, which
  appends one JSON line per finished span to `TRACES_FILE` (`{service}` in the path is replaced by the
  service's name): for tests and for looking at one machine's traces without a collector.

The W3C `traceparent` travels in the AMQP headers of every message (codec.encode adds the current span's) and
is taken up by the consumer or RPC server on the other side, so one synthesis is one trace across gateway,
dispatcher, worker, storage and billing. The correlation id stays what logs are searched by; log lines
carry the `trace_id` too while a span is active.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager, nullcontext
from typing import Any

_tracer: Any = None
_provider: Any = None
_propagator: Any = None
_KINDS = ("internal", "server", "client", "producer", "consumer")
HEADERS = ("traceparent", "tracestate")


def enabled() -> bool:
    return _tracer is not None


def configure(service: str, *, exporter: Any = None, env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on when the environment asks for it (or `exporter`, a SpanExporter, is given); True if on."""
    global _tracer, _provider, _propagator
    env = os.environ if env is None else env
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    kind = (env.get("OTEL_TRACES_EXPORTER") or ("otlp" if endpoint else "none")).strip().lower()
    if exporter is None and kind == "none":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    name = env.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif kind == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # As the OpenTelemetry specification says: a base endpoint gets /v1/traces, a traces endpoint is taken
        # as it is. Headers, timeout and compression come from the standard OTEL_EXPORTER_OTLP_* variables.
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (f"{base.rstrip('/')}/v1/traces" if base else None)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url) if url else OTLPSpanExporter()))
    elif kind == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif kind == "file":
        path = env.get("TRACES_FILE")
        if not path:
            raise ValueError("OTEL_TRACES_EXPORTER=file needs TRACES_FILE")
        # Written as each span ends, so a killed process loses nothing already finished.
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path.replace("{service}", name))))
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER must be otlp, console, file or none, not {kind!r}")
    if _provider is not None:
        _provider.shutdown()
    _provider, _propagator = provider, TraceContextTextMapPropagator()
    _tracer = provider.get_tracer("timbre")
    return True


def shutdown() -> None:
    """Flush what is batched and turn tracing off (at process exit; tests that configured it)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def _kind(kind: str) -> Any:
    from opentelemetry.trace import SpanKind

    return getattr(SpanKind, kind.upper())


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}


@contextmanager
def _span(name: str, kind: str, context: Any, attributes: Mapping[str, Any]) -> Iterator[Any]:
    # start_as_current_span records an exception escaping the block and marks the span as an error.
    with _tracer.start_as_current_span(name, context=context, kind=_kind(kind),
                                       attributes=_clean(attributes)) as current:
        yield current


def span(name: str, *, kind: str = "internal", **attributes: Any) -> Any:
    """A child of the current span (a context manager yielding it, or None when tracing is off)."""
    if _tracer is None:
        return nullcontext()
    return _span(name, kind, None, attributes)


def child_span(name: str, *, kind: str = "internal", **attributes: Any) -> Any:
    """Like `span`, but only inside a trace: periodic work (heartbeats) does not start a trace of its own."""
    if _tracer is None:
        return nullcontext()
    from opentelemetry import trace

    if not trace.get_current_span().get_span_context().is_valid:
        return nullcontext()
    return _span(name, kind, None, attributes)


def continued(name: str, headers: Mapping[str, Any] | None, *, kind: str = "consumer", **attributes: Any) -> Any:
    """A span continuing the trace whose `traceparent` is in `headers` (AMQP or HTTP), or a new root."""
    if _tracer is None:
        return nullcontext()
    carrier = {}
    for key in HEADERS:
        value = (headers or {}).get(key)
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode("latin-1")
        if isinstance(value, str):
            carrier[key] = value
    return _span(name, kind, _propagator.extract(carrier) if carrier else None, attributes)


def inject(headers: MutableMapping[str, Any]) -> None:
    """Add the current span's `traceparent` (and `tracestate`) to outgoing headers; nothing when off."""
    if _tracer is not None:
        _propagator.inject(headers)


def current_trace_id() -> str | None:
    """The active span's trace id in hex (as trace back ends show it), or None."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def set_attributes(**attributes: Any) -> None:
    """Add attributes to the active span (nothing when off)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(_clean(attributes))


class JsonLinesSpanExporter:
    """A SpanExporter appending one compact JSON object per span to a file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for s in spans:
            ctx, parent = s.get_span_context(), s.parent
            lines.append(json.dumps({
                "service": s.resource.attributes.get("service.name"),
                "name": s.name,
                "kind": s.kind.name.lower(),
                "trace_id": format(ctx.trace_id, "032x"),
                "span_id": format(ctx.span_id, "016x"),
                "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
                "start_ns": s.start_time,
                "end_ns": s.end_time,
                "status": s.status.status_code.name.lower(),
                "attributes": dict(s.attributes or {}),
            }, default=str))
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class HttpTracingMiddleware:
    """A server span per HTTP request, named by method and route template (ASGI); a new trace at the edge."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # Scrapes are not traced: one every few seconds would bury the requests worth looking at.
        if _tracer is None or scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        from .metrics import route_template

        # Public callers' traceparent headers are not trusted: each request starts its own trace.
        with _span(scope["method"], "server", None, {"http.request.method": scope["method"]}) as current:

            async def send_traced(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    current.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        from opentelemetry.trace import Status, StatusCode

                        current.set_status(Status(StatusCode.ERROR))
                    for name, value in message.get("headers", []):
                        if name == b"x-request-id":
                            current.set_attribute("timbre.correlation_id", value.decode("latin-1"))
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                route = route_template(scope)
                current.update_name(f"{scope['method']} {route}")
                current.set_attribute("http.route", route)
