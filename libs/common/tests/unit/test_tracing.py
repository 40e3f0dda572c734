"""Tracing: off costs nothing and adds nothing; on, the traceparent survives a trip through headers."""
from __future__ import annotations

import io
import json

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from timbre_common import tracing
from timbre_common.logging import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _off_after():
    yield
    tracing.shutdown()


def test_off_by_default_and_then_inert():
    assert tracing.configure("svc", env={}) is False
    assert not tracing.enabled()
    headers: dict[str, object] = {}
    tracing.inject(headers)
    assert headers == {}
    with tracing.span("nothing") as current, tracing.continued("nothing", {"traceparent": "00-x"}) as other:
        assert current is None and other is None
    assert tracing.current_trace_id() is None


def test_a_traceparent_round_trip_through_message_headers():
    exporter = InMemorySpanExporter()
    tracing.configure("svc", exporter=exporter, env={})
    headers: dict[str, object] = {}
    with tracing.span("send", kind="producer"):
        sent_trace = tracing.current_trace_id()
        tracing.inject(headers)
    assert str(headers["traceparent"]).startswith(f"00-{sent_trace}-")
    # AMQP may hand header values back as bytes.
    with tracing.continued("receive", {"traceparent": str(headers["traceparent"]).encode()}, kind="consumer"):
        assert tracing.current_trace_id() == sent_trace
    send, receive = sorted(exporter.get_finished_spans(), key=lambda s: s.name == "receive")
    assert receive.parent.span_id == send.context.span_id
    # Without a traceparent, a new trace.
    with tracing.continued("fresh", {}):
        assert tracing.current_trace_id() not in (None, sent_trace)


def test_an_error_escaping_a_span_marks_it_failed():
    exporter = InMemorySpanExporter()
    tracing.configure("svc", exporter=exporter, env={})
    with pytest.raises(RuntimeError), tracing.span("boom"):
        raise RuntimeError("no")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code.name == "ERROR"


def test_log_lines_carry_the_trace_id_while_a_span_is_active():
    exporter = InMemorySpanExporter()
    tracing.configure("svc", exporter=exporter, env={})
    out = io.StringIO()
    configure_logging("svc", "INFO", stream=out)
    log = get_logger("t")
    log.info("outside")
    with tracing.span("work"):
        trace_id = tracing.current_trace_id()
        log.info("inside")
    outside, inside = (json.loads(line) for line in out.getvalue().splitlines())
    assert "trace_id" not in outside
    assert inside["trace_id"] == trace_id


def test_file_exporter_writes_one_json_line_per_span(tmp_path):
    env = {"OTEL_TRACES_EXPORTER": "file", "TRACES_FILE": str(tmp_path / "{service}.jsonl")}
    assert tracing.configure("storage", env=env) is True
    with tracing.span("outer", kind="server"), tracing.span("inner", key="a"):
        pass
    lines = [json.loads(line) for line in (tmp_path / "storage.jsonl").read_text().splitlines()]
    inner, outer = lines
    assert (inner["name"], outer["name"]) == ("inner", "outer")
    assert inner["service"] == "storage" and inner["attributes"] == {"key": "a"}
    assert inner["trace_id"] == outer["trace_id"] and inner["parent_span_id"] == outer["span_id"]
    assert outer["parent_span_id"] is None and outer["kind"] == "server"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="TRACES_FILE"):
        tracing.configure("svc", env={"OTEL_TRACES_EXPORTER": "file"})
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        tracing.configure("svc", env={"OTEL_TRACES_EXPORTER": "jaeger"})
    # An OTLP endpoint alone turns the OTLP exporter on.
    assert tracing.configure("svc", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}) is True


def test_a_child_span_needs_a_trace_to_join():
    exporter = InMemorySpanExporter()
    tracing.configure("svc", exporter=exporter, env={})
    with tracing.child_span("heartbeat publish") as alone:
        assert alone is None
    with tracing.span("request"), tracing.child_span("publish") as child:
        assert child is not None
    assert [s.name for s in exporter.get_finished_spans()] == ["publish", "request"]


def test_otlp_exporter_sends_the_spans_to_the_configured_collector():
    """A local OTLP/HTTP receiver gets the protobuf export of a finished span at /v1/traces."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from timbre_common.testing import LoopbackServer

    received: list[tuple[str, bytes]] = []

    async def collector(scope, receive, send):  # type: ignore[no-untyped-def]
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        received.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-protobuf")]})
        await send({"type": "http.response.body", "body": b""})

    server = LoopbackServer(collector).start()
    try:
        assert tracing.configure("voices", env={"OTEL_EXPORTER_OTLP_ENDPOINT": server.url}) is True
        with tracing.span("voices voices.get", kind="server", account="a1"):
            trace_id = tracing.current_trace_id()
        tracing.shutdown()  # flushes the batch
    finally:
        server.stop()
    assert [path for path, _ in received] == ["/v1/traces"]
    request = ExportTraceServiceRequest.FromString(received[0][1])
    (resource_spans,) = request.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
    (span,) = resource_spans.scope_spans[0].spans
    assert (service, span.name, span.trace_id.hex()) == ("voices", "voices voices.get", trace_id)
