"""Time to first audio and total time through the whole platform, streamed against not streamed, as ratios
against the embedded backend's own time to make its first piece, measured in the same run.

    python bench/stream_latency.py [--url http://127.0.0.1:8000 --admin-secret ...] [-n 10]

Without --url the script starts its own platform (every service as a process, a fresh database and bus
namespace, billing off, the embedded voices) and stops it at the end. For each embedded voice (joe, heart)
and a one-sentence and a five-sentence text, it measures (medians of n cache misses, each text made unique
at its end so the first piece is the same every time):

- backend: the embedded backend in this process, a streamed request: time to its first piece and in all;
- streamed: POST /v1/synthesize with "stream": true, response_format pcm: time to the first audio byte at
  the client, and to the last;
- not streamed: POST /v1/synthesize (202), polling the job every 10 ms, then GET its audio: first audio is
  the whole audio.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import httpx

from timbre_common.catalogue import SYSTEM_VOICES

ONE = "The lighthouse keeper climbed the stairs at dusk to light the lamp for the night"
FIVE = ("The lighthouse keeper climbed the stairs at dusk to light the lamp. He watched the sea for a while. "
        "A small boat drifted past the rocks below. Its crew waved and sang an old song. "
        "By midnight the harbour was quiet again")


def _text(base: str, i: int) -> str:
    # Unique at the end, so each request is a cache miss whose first piece is the same as the baseline's.
    return f"{base}, take {i}."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnPlatform:
    """Every service as a process on a fresh database and bus namespace."""

    def __init__(self) -> None:
        from timbre_common.supervisor import Platform, ensure_database

        base = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/timbre")
        self.db_url = urlunparse(urlparse(base)._replace(path=f"/timbre_bench_{uuid.uuid4().hex[:8]}"))
        asyncio.run(ensure_database(self.db_url))
        self.tmp = tempfile.TemporaryDirectory(prefix="timbre-bench-")
        port = _free_port()
        self.admin = "bench-" + secrets.token_hex(16)
        self.namespace = f"bench{uuid.uuid4().hex[:8]}"
        self.url = f"http://127.0.0.1:{port}"
        env = {"TIMBRE_ENV": "test", "DATABASE_URL": self.db_url, "BUS_NAMESPACE": self.namespace,
               "AMQP_URL": os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
               "PORT": str(port), "ADMIN_SECRET": self.admin, "MODAL_CALLBACK_SECRET": secrets.token_hex(16),
               "STORAGE_BACKEND": "fs", "STORAGE_ROOT": str(Path(self.tmp.name) / "blobs"),
               "STORAGE_PUBLIC_URL": f"http://127.0.0.1:{_free_port()}", "STORAGE_SIGNING_KEY": secrets.token_hex(32),
               "BILLING": "off", "BACKENDS": "embedded", "HEARTBEAT_INTERVAL_S": "1", "LOG_LEVEL": "WARNING",
               "PYTHONUNBUFFERED": "1"}
        self.platform = Platform(env=env, log_dir=Path(self.tmp.name) / "logs")

    def start(self) -> None:
        self.platform.start_all()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{self.url}/v1/health", timeout=2)
                if r.status_code == 200 and "embedded" in r.json()["backends"]:
                    return
            except httpx.HTTPError:
                pass
            if self.platform.exited():
                break
            time.sleep(0.3)
        self.stop()
        sys.exit("the platform did not come up")

    def stop(self) -> None:
        from timbre_common.messaging import Names
        from timbre_common.supervisor import drop_database

        self.platform.stop_all()
        asyncio.run(drop_database(self.db_url))

        async def clean() -> None:
            import aio_pika

            from timbre_common.messaging.topology import delete_topology

            conn = await aio_pika.connect(self.platform.env["AMQP_URL"])
            await delete_topology(await conn.channel(), Names(self.namespace))
            await conn.close()

        asyncio.run(clean())
        self.tmp.cleanup()


def backend_times(backend, voice: str, text: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """The backend's own: seconds to its first piece, and in all, for a streamed request."""
    from timbre_gpu_worker.backends.base import SynthesisRequest

    first: list[float] = []
    started = time.perf_counter()

    def on_chunk(*_: object) -> None:
        if not first:
            first.append(time.perf_counter() - started)

    [result] = backend.synthesize_batch([SynthesisRequest(job_id="bench", text=text, lang="en", voice_id="bench",
                                                          system_voice=voice, on_chunk=on_chunk)])
    if isinstance(result, Exception):
        raise result
    return first[0], time.perf_counter() - started


def streamed(http: httpx.Client, auth: dict, voice_id: str, text: str) -> tuple[float, float]:
    body = {"voice_id": voice_id, "text": text, "stream": True, "response_format": "pcm"}
    started = time.perf_counter()
    first = None
    with http.stream("POST", "/v1/synthesize", json=body, headers=auth) as r:
        if r.status_code != 200 or r.headers.get("X-Cache") != "MISS":
            sys.exit(f"unexpected answer {r.status_code} {r.headers.get('X-Cache')}: {r.read()[:300]!r}")
        for chunk in r.iter_raw():
            if chunk and first is None:
                first = time.perf_counter() - started
    assert first is not None
    return first, time.perf_counter() - started


def not_streamed(http: httpx.Client, auth: dict, voice_id: str, text: str) -> tuple[float, float]:
    started = time.perf_counter()
    r = http.post("/v1/synthesize", json={"voice_id": voice_id, "text": text, "response_format": "pcm"},
                  headers=auth)
    if r.status_code != 202:
        sys.exit(f"unexpected answer {r.status_code}: {r.text[:300]}")
    job_id = r.json()["job_id"]
    while (job := http.get(f"/v1/jobs/{job_id}", headers=auth).json())["status"] == "pending":
        time.sleep(0.01)
    if job["status"] != "ready":
        sys.exit(f"job failed: {job}")
    audio = http.get(f"/v1/jobs/{job_id}/audio", headers=auth)
    assert audio.status_code == 200 and audio.content
    total = time.perf_counter() - started
    return total, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running platform (make up); without it the script starts its own")
    parser.add_argument("--admin-secret", default=os.environ.get("ADMIN_SECRET", "dev-admin-secret"))
    parser.add_argument("-n", type=int, default=10, help="cache misses per measured cell")
    parser.add_argument("--voices", default="joe,heart", help="embedded voices to measure")
    args = parser.parse_args()

    from timbre_gpu_worker.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend()
    backend.load()
    own = None
    if args.url is None:
        own = OwnPlatform()
        own.start()
        url, admin = own.url, own.admin
    else:
        url, admin = args.url, args.admin_secret
    try:
        http = httpx.Client(base_url=url, timeout=120)
        created = http.post("/v1/keys", json={"label": "bench", "rate_per_minute": 100_000, "max_concurrent": 100},
                            headers={"Authorization": f"Bearer {admin}"})
        if created.status_code != 201:
            sys.exit(f"could not create a key ({created.status_code}): {created.text}")
        auth = {"Authorization": f"Bearer {created.json()['api_key']}"}
        voices = {v.name: v.voice_id for v in SYSTEM_VOICES}
        run = uuid.uuid4().hex[:6]
        rows = []
        for voice in args.voices.split(","):
            for label, base in (("1 sentence", ONE), ("5 sentences", FIVE)):
                # One warm-up of each path (model caches, connections), not measured.
                backend_times(backend, voice, _text(base, 0))
                streamed(http, auth, voices[voice], _text(base + f" {run}", -1))
                cells: dict[str, list[tuple[float, float]]] = {"backend": [], "streamed": [], "not streamed": []}
                for i in range(args.n):
                    # Interleaved, so whatever else the machine does weighs on every path alike.
                    cells["backend"].append(backend_times(backend, voice, _text(base, i)))
                    cells["streamed"].append(streamed(http, auth, voices[voice], _text(base + f" {run}", i)))
                    cells["not streamed"].append(not_streamed(http, auth, voices[voice],
                                                              _text(base + f" {run}b", i)))
                med = {k: (statistics.median(a for a, _ in v) * 1000, statistics.median(b for _, b in v) * 1000)
                       for k, v in cells.items()}
                rows.append((voice, label, med))
        print(f"{args.n} cache misses per cell, medians; ratios against the backend's own first piece "
              "measured in the same run")
        print("| voice | text | backend first piece / total | streamed first audio / total | "
              "not streamed first audio = total |")
        print("| --- | --- | ---: | ---: | ---: |")
        for voice, label, med in rows:
            base_first = med["backend"][0]
            print(f"| `{voice}` | {label} | {med['backend'][0]:.0f} ms (1.00×) / {med['backend'][1]:.0f} ms | "
                  f"{med['streamed'][0]:.0f} ms ({med['streamed'][0] / base_first:.2f}×) / "
                  f"{med['streamed'][1]:.0f} ms | "
                  f"{med['not streamed'][0]:.0f} ms ({med['not streamed'][0] / base_first:.2f}×) |")
    finally:
        if own is not None:
            own.stop()


if __name__ == "__main__":
    main()
