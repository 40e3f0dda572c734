"""Qwen3 decode speed on a GPU: the CUDA-graph path against the reference decode, measured in one run.

For each model size and path, at concurrency 1 and 8:
- "x real time": audio seconds per wall second (higher is faster); "RTF": wall seconds per audio second
  (lower is faster), both for one request alone;
- time to first audio of a stream (first piece out of `synthesize_stream`);
- aggregate throughput of 8 concurrent requests (audio seconds per wall second, all 8 together), and the
  speed-up of 8 concurrent over 8 sequential (8 x the one-request wall time measured in the same run);
- peak GPU memory of each measurement.

With `--checkpoint-0.6b DIR` / `--checkpoint-1.7b DIR` the real weights run and the texts end where the
model ends them. Without, random weights of the real sizes are built on the GPU: they never say
end-of-speech, so every request runs to a fixed frame bound; that measures the per-step cost of each
path, not speech quality. `--smoke` runs the same code on CPU with the tiny test model (reference path
only: the graphs need CUDA) to check that the script works.

Run through bench/gpu.sh on the GPU machine; `python bench/gpu_bench.py --smoke` anywhere.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for src in (ROOT / "gpu_worker" / "src", ROOT / "libs" / "common" / "src"):
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))

import numpy as np  # noqa: E402

SAMPLE_RATE = 24000
FRAME_S = 1920 / SAMPLE_RATE
TEXT = ("Timbre turns a short recording into a voice that reads any text aloud, "
        "quickly enough to hold a conversation with it.")


def _tiny_module() -> Any:
    spec = importlib.util.spec_from_file_location("timbre_qwen_tiny", ROOT / "gpu_worker" / "tests" / "qwen_tiny.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def reference_wav(path: Path | None, seconds: float = 4.0) -> bytes:
    """The reference recording: a file when given, else a voiced tone (enough for random weights)."""
    from timbre_common.audio import encode_wav

    if path is not None:
        return path.read_bytes()
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.5 * t)
    wav = 0.25 * np.sin(2 * np.pi * np.cumsum(f0) / SAMPLE_RATE) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t) ** 2)
    return encode_wav(wav.astype(np.float32), SAMPLE_RATE)


class Meter:
    """Peak accelerator memory of one measurement (0 on CPU)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    @contextlib.contextmanager
    def peak(self, out: dict) -> Any:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
                out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _stream_one(backend: Any, request: Any, start: threading.Event, out: list, index: int) -> None:
    start.wait()
    t0 = time.perf_counter()
    first = None
    samples = 0
    for piece in backend.synthesize_stream(request):
        if first is None:
            first = time.perf_counter() - t0
        samples += piece.size
    out[index] = (first, time.perf_counter() - t0, samples / SAMPLE_RATE)


def streams(backend: Any, requests: list, meter: Meter) -> dict:
    """len(requests) concurrent streams: time to first audio, and wall and audio of each."""
    out: list = [None] * len(requests)
    start = threading.Event()
    threads = [threading.Thread(target=_stream_one, args=(backend, r, start, out, i)) for i, r in enumerate(requests)]
    row: dict[str, Any] = {}
    with meter.peak(row):
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        start.set()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    firsts = sorted(o[0] for o in out)
    audio = sum(o[2] for o in out)
    row.update(wall_s=round(wall, 3), audio_s=round(audio, 3), first_audio_ms=round(1000 * statistics.median(firsts)),
               first_audio_ms_max=round(1000 * firsts[-1]), aggregate_x_real_time=round(audio / wall, 3))
    if len(requests) == 1:
        row.update(x_real_time=round(audio / wall, 3), rtf=round(wall / audio, 3))
    return row


def concurrent_batches(backend: Any, requests: list, meter: Meter, together: bool) -> dict:
    """All requests at once: one shared batch call (`together`) or one call per request from its own thread."""
    row: dict[str, Any] = {}
    results: list = [None] * len(requests)

    def one(i: int) -> None:
        results[i] = backend.synthesize_batch([requests[i]])[0]

    with meter.peak(row):
        t0 = time.perf_counter()
        if together:
            results = backend.synthesize_batch(requests)
        else:
            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        wall = time.perf_counter() - t0
    failed = [r for r in results if not hasattr(r, "samples")]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
    audio = sum(r.audio_seconds for r in results)
    row.update(wall_s=round(wall, 3), audio_s=round(audio, 3), aggregate_x_real_time=round(audio / wall, 3))
    return row


def library_row(backend: Any, request: Any, bound: int, size: str, weights: str) -> dict:
    """The kept library's own single-stream call on the same weights and prompt, against ours without
    streaming: how much of a request's time is our scheduling and chunked decoding, not the graphs."""
    decoder = backend._graph_decoder
    item = next(iter(backend._prompts.values())).item
    row: dict[str, Any] = {"size": size, "weights": weights, "path": "faster-qwen3-tts generate", "concurrency": 1}
    walls = []
    for _ in range(2):
        t0 = time.perf_counter()
        audio, sr = decoder.base.generate_voice_clone(text=request.text, language="English", voice_clone_prompt=[item],
                                                      max_new_tokens=bound, min_new_tokens=bound)
        walls.append(time.perf_counter() - t0)
    seconds = sum(len(a) for a in audio) / sr if isinstance(audio, list) else len(audio) / sr
    t0 = time.perf_counter()
    ours = backend.synthesize_batch([request])[0]
    ours_wall = time.perf_counter() - t0
    wall = min(walls)
    row.update(wall_s=round(wall, 3), audio_s=round(seconds, 3), x_real_time=round(seconds / wall, 3),
               rtf=round(wall / seconds, 3), aggregate_x_real_time=round(seconds / wall, 3),
               ours_whole_text_wall_s=round(ours_wall, 3), ours_x_real_time=round(ours.audio_seconds / ours_wall, 3),
               first_audio_ms=0, first_audio_ms_max=0)
    return row


def _first_ok(results: list) -> None:
    if not hasattr(results[0], "samples"):
        raise RuntimeError(f"the first request failed: {results[0]}")


def build_backend(size: str, checkpoint: Path | None, device: str, bound: int, workdir: Path, max_batch: int) -> tuple:
    from timbre_gpu_worker.backends.qwen3 import Qwen3Backend

    name = "qwen3-1.7b" if size == "1.7b" else "qwen3-0.6b"
    if checkpoint is not None:
        return Qwen3Backend(name, checkpoint, device=device, max_batch=max_batch), "real weights"
    started = time.perf_counter()
    model_dir = _tiny_module().build_random_model(workdir / f"random-{size}", size,
                                                  device=device if device.startswith("cuda") else "cpu")
    print(f"  built random weights of size {size} in {time.perf_counter() - started:.1f}s", flush=True)
    # Random weights never end a text: every request runs to `bound` frames.
    backend = Qwen3Backend(name, model_dir, device=device, max_batch=max_batch, min_new_tokens=bound,
                           tokens_per_char=0.0, dense_tokens_per_char=0.0)
    return backend, "random weights (per-step cost, not quality)"


def run_size(size: str, args: argparse.Namespace, deadline: float, workdir: Path) -> list[dict]:
    from timbre_gpu_worker.backends.base import SynthesisRequest

    checkpoint = getattr(args, f"checkpoint_{size.replace('.', '_')}", None)
    backend, weights = build_backend(size, checkpoint, args.device, args.bound, workdir, max(args.concurrency))
    started = time.perf_counter()
    backend.load()
    print(f"  loaded {backend.name} ({weights}) in {time.perf_counter() - started:.1f}s, "
          f"decode path {backend.decode_path}", flush=True)
    ref = reference_wav(args.ref_wav)
    meter = Meter(args.device.startswith("cuda"))

    def reqs(n: int, tag: str) -> list:
        return [SynthesisRequest(job_id=f"{tag}-{i}", text=TEXT, lang="en", voice_id="bench", reference_wav=ref,
                                 ref_text=args.ref_text) for i in range(n)]

    backend.profile_voice("bench", ref, args.ref_text)  # the prompt is computed once, as in production
    paths = ["cuda-graphs", "reference"] if backend.decode_path == "cuda-graphs" else ["reference"]
    try:
        _first_ok(backend.synthesize_batch(reqs(1, "warm")))  # first-call allocations out of the figures
    except Exception:
        if backend.decode_path != "cuda-graphs":
            raise
        traceback.print_exc()
        print("  the graph path failed its first request: measuring the reference alone", flush=True)
        paths = ["reference"]
    if "reference" in paths:
        with backend.reference_decode():
            _first_ok(backend.synthesize_batch(reqs(1, "warm-ref")))
    rows: list[dict] = []
    for path in paths:
        ctx = contextlib.nullcontext() if path == "cuda-graphs" else backend.reference_decode()
        with ctx:
            one_wall = None
            for c in args.concurrency:
                if path == "reference" and args.reference_concurrency and c not in args.reference_concurrency:
                    continue
                if time.monotonic() > deadline:
                    rows.append({"size": size, "path": path, "concurrency": c, "skipped": "time budget spent"})
                    continue
                row: dict[str, Any] = {"size": size, "weights": weights, "path": path, "concurrency": c}
                try:
                    row.update(streams(backend, reqs(c, f"s{c}"), meter))
                except Exception as exc:  # the other path and concurrency still get measured
                    traceback.print_exc()
                    rows.append({**row, "skipped": f"failed: {type(exc).__name__}: {exc}"[:300]})
                    continue
                if c == 1:
                    one_wall = row["wall_s"]
                else:
                    # The reference batches inside one generate call; the graph path through its scheduler.
                    try:
                        batch = concurrent_batches(backend, reqs(c, f"b{c}"), meter, together=(path == "reference"))
                    except Exception as exc:
                        traceback.print_exc()
                        row["batch_failed"] = f"{type(exc).__name__}: {exc}"[:300]
                        rows.append(row)
                        print("  " + json.dumps(row), flush=True)
                        continue
                    row["batch_wall_s"] = batch["wall_s"]
                    row["aggregate_x_real_time"] = batch["aggregate_x_real_time"]
                    row["peak_mem_gib"] = max(row.get("peak_mem_gib", 0), batch.get("peak_mem_gib", 0))
                    if one_wall is not None:
                        row["speedup_vs_sequential"] = round(c * one_wall / batch["wall_s"], 2)
                rows.append(row)
                print("  " + json.dumps(row), flush=True)
            if path == "cuda-graphs" and args.library_baseline:
                try:
                    lib = library_row(backend, reqs(1, "lib")[0], args.bound, size, weights)
                    rows.append(lib)
                    print("  " + json.dumps(lib), flush=True)
                except Exception:
                    traceback.print_exc()
    del backend
    if args.device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    head = ("| size | path | concurrency | x real time (1 request) | RTF (1 request) | first audio, median (max) "
            "| aggregate x real time | 8 concurrent vs 8 sequential | peak memory |")
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['size']} | {r['path']} | {r['concurrency']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(
            f"| {r['size']} | {r['path']} | {r['concurrency']} | {r.get('x_real_time', '')} | {r.get('rtf', '')} "
            f"| {r['first_audio_ms']} ms ({r['first_audio_ms_max']} ms) | {r['aggregate_x_real_time']} "
            f"| {str(r['speedup_vs_sequential']) + 'x' if 'speedup_vs_sequential' in r else ''} "
            f"| {r.get('peak_mem_gib', '')} GiB |")
    # Graphs against the reference, same size and concurrency, same run.
    ref = {(r["size"], r["concurrency"]): r for r in rows if r.get("path") == "reference" and "skipped" not in r}
    for r in rows:
        base = ref.get((r["size"], r["concurrency"]))
        if r.get("path") == "cuda-graphs" and "skipped" not in r and base:
            throughput = r["aggregate_x_real_time"] / base["aggregate_x_real_time"]
            sooner = base["first_audio_ms"] / max(r["first_audio_ms"], 1)
            lines.append(f"\n{r['size']} at {r['concurrency']}: graphs {throughput:.2f}x the reference's aggregate "
                         f"throughput, first audio {sooner:.2f}x sooner")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, reference path: checks the script")
    parser.add_argument("--sizes", default="0.6b,1.7b")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--checkpoint-0.6b", dest="checkpoint_0_6b", type=Path)
    parser.add_argument("--checkpoint-1.7b", dest="checkpoint_1_7b", type=Path)
    parser.add_argument("--ref-wav", type=Path, help="reference recording (default: a synthetic voiced tone)")
    parser.add_argument("--ref-text", help="its transcript (in-context cloning); without it, x-vector cloning")
    parser.add_argument("--bound", type=int, default=100, help="frames per request with random weights (8 s)")
    parser.add_argument("--budget-s", type=float, default=400, help="stop starting measurements after this")
    parser.add_argument("--device", default=None)
    parser.add_argument("--reference-concurrency", default="",
                        help="measure the reference decode only at these concurrencies (default: all)")
    parser.add_argument("--library-baseline", action="store_true",
                        help="also time faster-qwen3-tts's own single-stream generate on the same weights")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.concurrency, args.bound = "tiny", "1,2", 12
        args.device = args.device or "cpu"
    if args.device is None:
        import torch

        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.reference_concurrency = [int(c) for c in args.reference_concurrency.split(",") if c.strip()]
    deadline = time.monotonic() + args.budget_s
    from timbre_gpu_worker.backends.torchaudio_shim import ensure_torchaudio_importable

    ensure_torchaudio_importable()
    import torch

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"qwen3 decode bench on {device_name}, torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="timbre-gpu-bench-") as tmp:
        for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            if time.monotonic() > deadline:
                rows.append({"size": size, "path": "all", "concurrency": 0, "skipped": "time budget spent"})
                continue
            print(f"size {size}", flush=True)
            try:
                rows.extend(run_size(size, args, deadline, Path(tmp)))
            except Exception as exc:  # one size failing still leaves the other's figures
                traceback.print_exc()
                rows.append({"size": size, "path": "all", "concurrency": 0,
                             "skipped": f"failed: {type(exc).__name__}: {exc}"[:300]})
    print()
    print(table(rows))
    out = args.json or (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
