"""bench/gpu_bench.py --smoke: the GPU benchmark's code path runs on CPU with the tiny model."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_gpu_bench_smoke_runs_and_reports_both_speed_names(tmp_path: Path) -> None:
    if importlib.util.find_spec("qwen_tts") is None:
        pytest.skip("qwen-tts not installed (requirements/qwen-nodeps.txt)")
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x real time (1 request) | RTF (1 request)" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    one = next(r for r in rows if r["concurrency"] == 1)
    assert one["path"] == "reference" and one["audio_s"] > 0
    # The two names are reciprocal: x real time is audio per wall second, RTF wall per audio second.
    assert one["x_real_time"] * one["rtf"] == pytest.approx(1.0, rel=0.02)
    two = next(r for r in rows if r["concurrency"] == 2)
    assert two["first_audio_ms"] > 0 and "speedup_vs_sequential" in two
