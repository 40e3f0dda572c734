"""Prometheus metrics of every Timbre process, in one place, and the small server that exposes them.

Each process has one registry (prometheus-client's default); a metric a process never touches is simply
absent from its scrape, so every service can import this module. Labels stay bounded: route templates (never
raw paths), queue names without the namespace, backend names, command types.

The gateway serves `GET /metrics` on its API port behind the admin secret; every other service serves it on
`METRICS_PORT` (off unless set; `make up` gives each a fixed port) through `MetricsServer`.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

# Latency buckets for things that take milliseconds (HTTP, RPC, message handling) ...
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# ... and for jobs, which take from a fraction of a second (embedded voices) to minutes (a cold GPU).
_JOBS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
# Audio seconds per wall second of one synthesis: below 1 is slower than real time.
_SPEED = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)

# --- HTTP (the gateway's API, the storage service's signed-URL server) --------------------------------------
HTTP_REQUESTS = Counter("timbre_http_requests", "HTTP requests answered, by route template and status",
                        ["method", "route", "status"])
HTTP_LATENCY = Histogram("timbre_http_request_duration_seconds", "Time to answer an HTTP request",
                         ["method", "route"], buckets=_FAST)

# --- RPC over the bus -------------------------------------------------------------------------------------
RPC_CLIENT_LATENCY = Histogram("timbre_rpc_client_duration_seconds",
                               "Time from sending a command to another service until its reply (or timeout)",
                               ["target", "command", "outcome"], buckets=_FAST)
RPC_SERVER_LATENCY = Histogram("timbre_rpc_server_duration_seconds", "Time to handle one command served here",
                               ["command", "outcome"], buckets=_FAST)

# --- Events and work orders -------------------------------------------------------------------------------
MESSAGES_HANDLED = Counter("timbre_messages_handled", "Messages a consumer handled and acknowledged",
                           ["queue", "type"])
MESSAGES_RETRIED = Counter("timbre_messages_retried", "Messages whose handler failed, sent to a retry tier",
                           ["queue", "type"])
MESSAGES_DEAD_LETTERED = Counter("timbre_messages_dead_lettered",
                                 "Messages parked in a dead-letter queue (undecodable, or out of attempts)",
                                 ["queue", "reason"])
MESSAGE_HANDLING = Histogram("timbre_message_handling_duration_seconds", "Time a consumer spent on one message",
                             ["queue"], buckets=_FAST)
QUEUE_DEPTH = Gauge("timbre_queue_messages", "Messages ready in a consumer queue (polled)", ["queue"])
QUEUE_CONSUMERS = Gauge("timbre_queue_consumers", "Consumers attached to a consumer queue (polled)", ["queue"])
DEAD_LETTER_DEPTH = Gauge("timbre_dead_letter_messages", "Messages parked in a queue's dead-letter queue (polled)",
                          ["queue"])

# --- Synthesis ----------------------------------------------------------------------------------------------
JOBS_FINISHED = Counter("timbre_jobs_finished", "Synthesis jobs that reached ready or failed", ["backend", "outcome"])
JOB_LATENCY = Histogram("timbre_job_duration_seconds", "From a job's creation to its audio being stored (ready)",
                        ["backend"], buckets=_JOBS)
SYNTHESES = Counter("timbre_syntheses", "Syntheses a worker ran, by outcome", ["backend", "outcome"])
SYNTHESIS_AUDIO_SECONDS = Counter("timbre_synthesis_audio_seconds", "Seconds of audio synthesized", ["backend"])
SYNTHESIS_WALL_SECONDS = Counter("timbre_synthesis_wall_seconds", "Wall seconds spent synthesizing", ["backend"])
SYNTHESIS_SPEED = Histogram("timbre_synthesis_realtime_ratio",
                            "Audio seconds per wall second of one synthesis (x real time)", ["backend"],
                            buckets=_SPEED)
CACHE_LOOKUPS = Counter("timbre_synthesis_cache_lookups", "Synthesis requests answered from the cache (hit) or not",
                        ["backend", "result"])
BACKEND_AVAILABLE = Gauge("timbre_backend_available",
                          "1 while a worker (or Modal) advertises the backend, by the gateway's heartbeats",
                          ["backend"])

# --- Billing ------------------------------------------------------------------------------------------------
QUOTA_REFUSALS = Counter("timbre_quota_refusals", "Requests refused because the plan's character quota is used up")
QUOTA_HOLDS_ACTIVE = Gauge("timbre_quota_holds_active", "Quota holds not yet consumed, released or expired (polled)")
QUOTA_HOLD_OLDEST_AGE = Gauge("timbre_quota_hold_oldest_age_seconds", "Age of the oldest unexpired quota hold (polled)")

# --- Client webhooks: one increment per delivery attempt's outcome -----------------------------------------
# outcome: delivered (2xx), failed (retried later), parked (out of attempts), refused (endpoint not allowed).
WEBHOOK_DELIVERIES = Counter("timbre_webhook_deliveries", "Webhook delivery attempts, by event and outcome",
                             ["event", "outcome"])


def start_at_zero_for(backends: Iterable[str], *, worker: bool = False) -> None:
    """Create each backend's series at 0, so the first job already shows in rate() and increase()."""
    for backend in backends:
        if worker:
            for outcome in ("completed", "failed"):
                SYNTHESES.labels(backend, outcome)
            SYNTHESIS_AUDIO_SECONDS.labels(backend)
            SYNTHESIS_WALL_SECONDS.labels(backend)
            SYNTHESIS_SPEED.labels(backend)
        else:
            for outcome in ("ready", "failed"):
                JOBS_FINISHED.labels(backend, outcome)
            for result in ("hit", "miss"):
                CACHE_LOOKUPS.labels(backend, result)
            JOB_LATENCY.labels(backend)


def render() -> tuple[bytes, str]:
    """The current exposition text and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST


def authorized(headers: Iterable[tuple[bytes, bytes]], secret: str) -> bool:
    """True when no secret is set, or `Authorization: Bearer <secret>` is among the request's headers."""
    if not secret:
        return True
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret.encode())
    return False


def route_template(scope: dict[str, Any]) -> str:
    """The matched route's template (`/v1/jobs/{job_id}`), never the raw path; `unmatched` for a 404."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class HttpMetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status (ASGI)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_with_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The router wrote the matched route into the scope on the way in.
            route, method = route_template(scope), scope["method"]
            HTTP_REQUESTS.labels(method, route, str(status["code"])).inc()
            HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - started)


class _MetricsApp:
    """`GET /metrics` only, with the bearer check."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics" or scope["method"] not in ("GET", "HEAD"):
            status, body, ctype = 404, b'{"error":{"code":"not_found","message":"only GET /metrics"}}', \
                "application/json"
        elif not authorized(scope.get("headers", []), self.secret):
            status, body, ctype = 401, b'{"error":{"code":"invalid_metrics_secret","message":"bearer needed"}}', \
                "application/json"
        else:
            status, (body, ctype) = 200, render()
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})


class MetricsServer:
    """Serves `/metrics` on its own port inside the service's event loop."""

    def __init__(self, *, host: str, port: int, secret: str = "") -> None:
        from .runtime import HttpServer

        self.host, self.port = host, port
        self._server = HttpServer(_MetricsApp(secret), host=host, port=port)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()


async def poll_queues(connection: Any, names: Any, specs: Iterable[Any]) -> None:
    """Set the depth, consumer and dead-letter gauges of each existing queue by passive declares."""
    import aio_pika

    channel = None
    try:
        for spec in specs:
            for target, depth, consumers in ((names.queue(spec.name), QUEUE_DEPTH, QUEUE_CONSUMERS),
                                             (names.dlq(spec.name), DEAD_LETTER_DEPTH, None)):
                if channel is None or channel.is_closed:
                    channel = await connection.channel()
                try:
                    result = (await channel.declare_queue(target, passive=True)).declaration_result
                except aio_pika.exceptions.ChannelClosed:
                    continue  # not declared (a backend nobody runs): a passive declare closed the channel
                depth.labels(spec.name).set(result.message_count or 0)
                if consumers is not None:
                    consumers.labels(spec.name).set(result.consumer_count or 0)
    finally:
        if channel is not None and not channel.is_closed:
            await channel.close()


async def poll_queues_forever(connection: Any, names: Any, specs_of: Any, interval_s: float, log: Any) -> None:
    """`poll_queues` every `interval_s`; `specs_of()` gives the queues to look at (they may change)."""
    while True:
        try:
            await poll_queues(connection, names, specs_of())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next round tries again; a broker outage shows in other metrics
            log.warning("queue_poll_failed", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(interval_s)
