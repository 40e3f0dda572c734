"""Latency of the public API against a running platform (`make up`), as ratios against GET /v1/health.

    python bench/api_latency.py [--url http://127.0.0.1:8000] [--admin-secret ...] [-n 200]

Measures, one request at a time (p50 / p95 / p99 in ms): the health check (the baseline: HTTP and the
gateway alone), an authenticated read that crosses the bus (GET /v1/voices: the gateway calls the voices
service), a cache hit of POST /v1/synthesize (voices + billing + dispatcher + storage, audio in the body),
a job poll, and a cache miss through to a ready job with the embedded backend (the worker synthesizing).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable

import httpx

JOE = "748e3a3f-2412-59d1-829a-5914302b34de"


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return statistics.median(ordered), at(0.95), at(0.99)


def _timed(n: int, call: Callable[[], httpx.Response], expect: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        response = call()
        out.append((time.perf_counter() - started) * 1000)
        if response.status_code != expect:
            sys.exit(f"unexpected {response.status_code}: {response.text[:300]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--admin-secret", default=os.environ.get("ADMIN_SECRET", "dev-admin-secret"))
    parser.add_argument("-n", type=int, default=200, help="requests per measured call")
    parser.add_argument("--misses", type=int, default=10, help="cache misses measured through to ready")
    args = parser.parse_args()

    http = httpx.Client(base_url=args.url, timeout=60)
    created = http.post("/v1/keys", json={"label": "bench", "rate_per_minute": 100_000, "max_concurrent": 100},
                        headers={"Authorization": f"Bearer {args.admin_secret}"})
    if created.status_code != 201:
        sys.exit(f"could not create a key ({created.status_code}): is the platform up (make up)? {created.text}")
    auth = {"Authorization": f"Bearer {created.json()['api_key']}"}
    body = {"voice_id": JOE, "text": "Timbre measures its own latency."}
    first = http.post("/v1/synthesize", json=body, headers=auth)
    job_id = first.json()["job_id"] if first.status_code == 202 else first.headers["X-Job-Id"]
    while http.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "pending":
        time.sleep(0.05)

    rows = [
        ("GET /v1/health (baseline)", _timed(args.n, lambda: http.get("/v1/health"), 200)),
        ("GET /v1/voices", _timed(args.n, lambda: http.get("/v1/voices", headers=auth), 200)),
        ("GET /v1/jobs/{id}", _timed(args.n, lambda: http.get(f"/v1/jobs/{job_id}", headers=auth), 200)),
        ("POST /v1/synthesize, cache hit", _timed(args.n, lambda: http.post("/v1/synthesize", json=body,
                                                                             headers=auth), 200)),
    ]
    misses = []
    for _ in range(args.misses):
        text = f"A fresh sentence to synthesize, number {uuid.uuid4().hex[:8]}."
        started = time.perf_counter()
        accepted = http.post("/v1/synthesize", json={"voice_id": JOE, "text": text}, headers=auth)
        if accepted.status_code != 202:
            sys.exit(f"expected a miss, got {accepted.status_code}")
        while http.get(f"/v1/jobs/{accepted.json()['job_id']}", headers=auth).json()["status"] == "pending":
            time.sleep(0.01)
        misses.append((time.perf_counter() - started) * 1000)
    rows.append(("cache miss to ready (embedded joe)", misses))

    base = statistics.median(rows[0][1])
    print(f"API latency against {args.url}, one request at a time, n={args.n} (misses: {args.misses})")
    print(f"{'call':<38} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'p50 vs baseline':>16}")
    for name, samples in rows:
        p50, p95, p99 = _percentiles(samples)
        print(f"{name:<38} {p50:>8.2f} {p95:>8.2f} {p99:>8.2f} {p50 / base:>15.1f}x")


if __name__ == "__main__":
    main()
