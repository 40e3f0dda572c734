"""Cost of a download in another format: the first encodes it (and storage keeps it), later ones read it back.

    python bench/downloads.py [--seconds 360] [--formats opus,mp3] [-n 5]

Runs storage's own `get_rendition` over the fs bucket (a temp directory) and the object index in PostgreSQL
(DATABASE_URL, a throwaway schema). The audio is a speech-like signal of the length a 5,000-character job
makes (about 6 minutes at 24 kHz). Printed, per format: the first download (encode and keep), the median of
later downloads (read the kept object), and both as ratios against reading the WAV itself in the same run.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from timbre_common.audio import encode_wav
from timbre_common.db import create_pool, drop_schema, migrate
from timbre_storage import handlers
from timbre_storage.adapters.blob import FsBlobStore
from timbre_storage.adapters.repository import MIGRATIONS_DIR, ObjectRepository

ACCOUNT = "bench-account"


def _speechlike(seconds: float, sr: int = 24000) -> np.ndarray:
    t = np.arange(int(seconds * sr), dtype=np.float64) / sr
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voiced = np.sin(2 * np.pi * np.cumsum(pitch) / sr) + 0.4 * np.sin(4 * np.pi * np.cumsum(pitch) / sr)
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 3.1 * t)) * (np.sin(2 * np.pi * 0.21 * t) > -0.6)
    noise = np.random.default_rng(7).normal(0, 0.02, t.size)
    return (0.3 * voiced * envelope + noise).astype(np.float32)


async def _timed(call) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def main(seconds: float, formats: list[str], n: int) -> None:
    database_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/timbre")
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    pool = await create_pool(database_url, schema=schema)
    try:
        await migrate(pool, schema, MIGRATIONS_DIR)
        repo = ObjectRepository(pool)
        with tempfile.TemporaryDirectory() as root:
            store = FsBlobStore(Path(root), "http://127.0.0.1:8001", b"bench-signing-key-" + b"x" * 32)
            wav = encode_wav(_speechlike(seconds), 24000)
            source = await handlers.store_generated_audio(job_id=str(uuid.uuid4()), account_id=ACCOUNT,
                                                          created_at=datetime.now(UTC), wav=wav, repo=repo,
                                                          store=store)

            def read(fmt: str):  # type: ignore[no-untyped-def]
                return lambda: handlers.get_rendition(account_id=ACCOUNT, key=source.key, fmt=fmt, repo=repo,
                                                      store=store)

            baseline = statistics.median([await _timed(read("wav")) for _ in range(n)])
            print(f"audio: {seconds:.0f} s, WAV {len(wav) / 1e6:.1f} MB; python {sys.version.split()[0]}")
            print(f"{'download':<34}{'ms':>10}{'x WAV read':>12}")
            print(f"{'wav (baseline: read the object)':<34}{baseline:>10.1f}{1.0:>12.1f}")
            for fmt in formats:
                first = await _timed(read(fmt))
                later = statistics.median([await _timed(read(fmt)) for _ in range(n)])
                print(f"{fmt + ', first (encode and keep)':<34}{first:>10.1f}{first / baseline:>12.1f}")
                print(f"{fmt + ', later (read the kept object)':<34}{later:>10.1f}{later / baseline:>12.1f}")
    finally:
        await pool.close()
        await drop_schema(database_url, schema)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=360.0)
    parser.add_argument("--formats", default="opus,mp3")
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, [f for f in args.formats.split(",") if f], args.n))
