"""The hot path against the floor: a bare FastAPI app returning the same body, measured in the same run.

    python bench/load.py [--url http://127.0.0.1:8000 --admin-secret ...] [--connections 32] [--seconds 10]

Without --url the script starts its own platform (every service as a process, a fresh database and bus
namespace, billing off, the embedded voices; see bench/stream_latency.py) and stops it at the end. Next to
it, it starts the floor: a bare FastAPI app under uvicorn (one worker, uvloop and httptools, no access log)
that answers a POST with the very WAV bytes a cache hit of the platform returns.

It reports, as ratios against the floor:
- throughput of a cache-hit POST /v1/synthesize at --connections keep-alive connections (a small asyncio
  load generator on loopback, bounded in requests and time), against the floor's at the same load;
- at one connection, p50 / p95 of a cache hit, a job poll (GET /v1/jobs/{id}), an audio download
  (GET /v1/jobs/{id}/audio) and a cache miss's 202, against the floor's p50.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

JOE = "748e3a3f-2412-59d1-829a-5914302b34de"
HIT_TEXT = "Timbre measures its hot path against the floor."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _floor_app(body_path: str, port: int) -> None:
    """The floor: the least a Python HTTP service can do to answer with these bytes."""
    import uvicorn
    from fastapi import FastAPI, Response

    body = Path(body_path).read_bytes()
    app = FastAPI()

    @app.post("/v1/synthesize")
    async def synthesize() -> Response:
        return Response(body, media_type="audio/wav")

    @app.get("/v1/health")
    async def health() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, loop="uvloop", http="httptools",
                access_log=False, log_level="warning")


class _Conn:
    """One keep-alive HTTP/1.1 connection on loopback; requests are sent one after another."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
            elif name.strip().lower() == "connection" and value.strip().lower() == "close":
                close = True
        body = await self.reader.readexactly(length) if length else b""
        if close:
            self.writer.close()
            self.writer = None
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _raw(method: str, path: str, host: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _throughput(url: str, raws: list[bytes], expect: int, connections: int, seconds: float,
                      max_requests: int) -> tuple[float, float, dict[int, int]]:
    """Requests/s and p50 ms at `connections` connections, bounded by `seconds` and `max_requests`; connection
    i sends raws[i % len(raws)] (one API key per connection, so a key's rate limit does not bound the run)."""
    parsed = httpx.URL(url)
    done: list[float] = []
    errors: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    async def worker(raw: bytes) -> None:
        conn = _Conn(parsed.host, parsed.port or 80)
        try:
            while time.perf_counter() < deadline and len(done) < max_requests:
                started = time.perf_counter()
                status, _ = await conn.request(raw)
                if status != expect:
                    errors[status] = errors.get(status, 0) + 1
                    continue
                done.append(time.perf_counter() - started)
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(raws[i % len(raws)]) for i in range(connections)))
    elapsed = time.perf_counter() - started
    return len(done) / elapsed, statistics.median(done) * 1000 if done else float("nan"), errors


async def _one_at_a_time(url: str, make_raw, expect: int, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    parsed = httpx.URL(url)
    conn = _Conn(parsed.host, parsed.port or 80)
    out = []
    try:
        for i in range(n):
            raw = make_raw(i)
            started = time.perf_counter()
            status, body = await conn.request(raw)
            out.append((time.perf_counter() - started) * 1000)
            if status != expect:
                sys.exit(f"unexpected {status} (wanted {expect}): {body[:300]!r}")
    finally:
        conn.close()
    return out


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running platform (make up); without it the script starts its own")
    parser.add_argument("--admin-secret", default=os.environ.get("ADMIN_SECRET", "dev-admin-secret"))
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="time bound of each throughput run")
    parser.add_argument("--max-requests", type=int, default=50_000, help="request bound of each run")
    parser.add_argument("-n", type=int, default=200, help="requests per one-connection measurement")
    parser.add_argument("--misses", type=int, default=50, help="cache misses measured (202s)")
    args = parser.parse_args()

    own = None
    if args.url is None:
        from stream_latency import OwnPlatform

        own = OwnPlatform()
        own.start()
        url, admin = own.url, own.admin
    else:
        url, admin = args.url, args.admin_secret
    floor_proc = None
    try:
        http = httpx.Client(base_url=url, timeout=60)
        keys: list[str] = []
        account: dict[str, str] = {}
        for _ in range(args.connections):
            # Keys of one account: the cache is the account's, so every connection hits the same entry.
            created = http.post("/v1/keys", json={"label": "bench-load", "rate_per_minute": 100_000,
                                                  "max_concurrent": 100, **account},
                                headers={"Authorization": f"Bearer {admin}"})
            if created.status_code != 201:
                sys.exit(f"could not create a key ({created.status_code}): {created.text}")
            keys.append(created.json()["api_key"])
            account = {"account_id": created.json()["account_id"]}
        key = keys[0]
        auth = {"Authorization": f"Bearer {key}"}
        hit_body = json.dumps({"voice_id": JOE, "text": HIT_TEXT}).encode()
        first = http.post("/v1/synthesize", content=hit_body, headers={**auth, "Content-Type": "application/json"})
        job_id = first.json()["job_id"] if first.status_code == 202 else first.headers["X-Job-Id"]
        while http.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "pending":
            time.sleep(0.05)
        hit = http.post("/v1/synthesize", content=hit_body, headers={**auth, "Content-Type": "application/json"})
        if hit.status_code != 200:
            sys.exit(f"expected a cache hit, got {hit.status_code}: {hit.text[:300]}")
        wav = hit.content

        # The floor, in its own process, answering with the same bytes.
        body_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"timbre-load-{uuid.uuid4().hex[:8]}.wav"
        body_file.write_bytes(wav)
        floor_port = _free_port()
        floor_proc = multiprocessing.get_context("spawn").Process(target=_floor_app,
                                                                  args=(str(body_file), floor_port))
        floor_proc.start()
        floor_url = f"http://127.0.0.1:{floor_port}"
        for _ in range(200):
            try:
                if httpx.get(f"{floor_url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)

        host = httpx.URL(url).netloc.decode()
        json_headers = {**auth, "Content-Type": "application/json"}
        hit_raw = _raw("POST", "/v1/synthesize", host, json_headers, hit_body)
        hit_raws = [_raw("POST", "/v1/synthesize", host, {"Authorization": f"Bearer {k}",
                                                         "Content-Type": "application/json"}, hit_body)
                    for k in keys]
        floor_raw = _raw("POST", "/v1/synthesize", f"127.0.0.1:{floor_port}", {"Content-Type": "application/json"},
                         hit_body)
        run = uuid.uuid4().hex[:8]

        def miss_raw(i: int) -> bytes:
            body = json.dumps({"voice_id": JOE, "text": f"A fresh sentence, {run} number {i}."}).encode()
            return _raw("POST", "/v1/synthesize", host, json_headers, body)

        async def measure() -> dict:
            # Warm-up of both, not measured.
            await _throughput(floor_url, [floor_raw], 200, args.connections, 1.0, 2000)
            await _throughput(url, hit_raws, 200, args.connections, 1.0, 500)
            res = {
                "floor_rps": await _throughput(floor_url, [floor_raw], 200, args.connections, args.seconds,
                                               args.max_requests),
                "hit_rps": await _throughput(url, hit_raws, 200, args.connections, args.seconds, args.max_requests),
                "floor_1": await _one_at_a_time(floor_url, lambda i: floor_raw, 200, args.n),
                "hit_1": await _one_at_a_time(url, lambda i: hit_raw, 200, args.n),
                "poll_1": await _one_at_a_time(url, lambda i: _raw("GET", f"/v1/jobs/{job_id}", host, auth), 200,
                                               args.n),
                "audio_1": await _one_at_a_time(url, lambda i: _raw("GET", f"/v1/jobs/{job_id}/audio", host, auth),
                                                200, args.n),
                "miss_1": await _one_at_a_time(url, miss_raw, 202, args.misses),
            }
            return res

        res = asyncio.run(measure())
        body_file.unlink(missing_ok=True)
    finally:
        if floor_proc is not None:
            floor_proc.terminate()
            floor_proc.join(5)
        if own is not None:
            own.stop()

    floor_rps, floor_p50_c, _ = res["floor_rps"]
    hit_rps, hit_p50_c, hit_errors = res["hit_rps"]
    floor_p50 = statistics.median(res["floor_1"])
    print(f"Hot path against the floor (bare FastAPI + uvicorn returning the same {len(wav)}-byte WAV), same run")
    print("| measure | platform | floor | platform / floor |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| cache-hit throughput, {args.connections} connections | {hit_rps:.0f} req/s (p50 {hit_p50_c:.1f} ms)"
          f" | {floor_rps:.0f} req/s (p50 {floor_p50_c:.1f} ms) | {hit_rps / floor_rps * 100:.1f} % |")
    for name, key_ in (("cache hit", "hit_1"), ("job poll", "poll_1"), ("audio download", "audio_1"),
                       ("cache miss → 202", "miss_1")):
        samples = res[key_]
        p50 = statistics.median(samples)
        print(f"| {name}, 1 connection, p50 / p95 | {p50:.2f} / {_p(samples, 0.95):.2f} ms | "
              f"{floor_p50:.2f} / {_p(res['floor_1'], 0.95):.2f} ms | {p50 / floor_p50:.1f}× |")
    if hit_errors:
        print(f"(cache-hit answers under load that were not 200, by status: {hit_errors})")


if __name__ == "__main__":
    main()
