"""Timbre GPU worker on Modal: Qwen3-TTS on an A100, results POSTed back to the gateway.

Deploy with `modal deploy deploy/modal_app.py` (see deploy/MODAL.md). The payload -> callback logic
lives in `process_jobs`, which takes its dependencies as arguments so tests run it without Modal.
"""
from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("timbre.modal")

APP_NAME = os.environ.get("TIMBRE_MODAL_APP", "timbre-gpu-worker")
MODELS_ROOT = "/models"
CHECKPOINTS = {
    "qwen3-1.7b": "Qwen/Qwen3-TTS-12Hz-1.7B-Base",
    "qwen3-0.6b": "Qwen/Qwen3-TTS-12Hz-0.6B-Base",
}
# A torch/torchaudio pair built for the same CUDA: qwen-tts imports torchaudio, and a mismatched
# pair fails to load its C++ library.
TORCH_PAIR = ("torch==2.8.0", "torchaudio==2.8.0")
TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
CALLBACK_ATTEMPTS = 6
CALLBACK_BACKOFF_S = 0.5

PayloadPost = Callable[[str, dict[str, Any], dict[str, str]], int]


def model_dir(backend: str) -> Path:
    """Where the image holds a backend's checkpoint."""
    return Path(MODELS_ROOT) / backend


# -- testable core -----------------------------------------------------------------------------


def post_with_retry(
    post: PayloadPost,
    url: str,
    body: dict[str, Any],
    secret: str,
    *,
    attempts: int = CALLBACK_ATTEMPTS,
    backoff_s: float = CALLBACK_BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> int | None:
    """POST the callback; retry 5xx and connection errors with exponential back-off; return last status."""
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    status: int | None = None
    for attempt in range(attempts):
        try:
            status = post(url, body, headers)
        except Exception as exc:  # connection refused, reset, timeout: the gateway may be restarting
            log.warning("callback for %s failed (%s), attempt %d", body.get("job_id"), exc, attempt + 1)
            status = None
        else:
            # 2xx done; 4xx will not get better (bad secret, unknown job): stop and let the deadline act.
            if status < 500:
                return status
            log.warning("callback for %s got %d, attempt %d", body.get("job_id"), status, attempt + 1)
        if attempt + 1 < attempts:
            sleep(backoff_s * (2**attempt))
    return status


def _reference_bytes(payload: Mapping[str, Any], fetch: Callable[[str], bytes]) -> bytes | None:
    if payload.get("ref_audio_b64"):
        return base64.b64decode(payload["ref_audio_b64"])
    url = payload.get("reference_url") or payload.get("ref_audio_url")
    return fetch(url) if url else None


def process_jobs(
    payloads: Sequence[Mapping[str, Any]],
    backend_for: Callable[[str], Any],
    fetch: Callable[[str], bytes],
    post: PayloadPost,
    *,
    encode_wav: Callable[[Any, int], bytes] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict[str, Any]]:
    """Synthesize a batch of job payloads and POST one callback per job; returns the bodies sent.

    `backend_for(name)` returns a loaded backend; `fetch(url)` returns bytes (raises on failure);
    `post(url, json_body, headers)` returns the HTTP status. Every payload gets exactly one
    callback, with `error` set when anything about that job failed.
    """
    from timbre_gpu_worker.backends.base import BackendError, SynthesisRequest

    if encode_wav is None:
        from timbre_common.audio import encode_wav as _encode

        encode_wav = _encode

    bodies: dict[int, dict[str, Any]] = {}
    groups: dict[str, list[tuple[int, Any]]] = {}
    for i, p in enumerate(payloads):
        base = {"job_id": p.get("job_id"), "voice_id": p.get("voice_id"), "cache_key": p.get("cache_key"),
                "wav_b64": None, "error": None, "error_code": None, "synthesis_ms": 0,
                "audio_seconds": 0.0, "rtf": None}
        bodies[i] = base
        try:
            reference = _reference_bytes(p, fetch)
        except Exception as exc:
            base.update(error=f"could not fetch the reference audio: {exc}", error_code="reference_unavailable")
            continue
        req = SynthesisRequest(job_id=str(p["job_id"]), text=str(p.get("text", "")), lang=str(p.get("lang", "en")),
                               voice_id=str(p.get("voice_id", "")), reference_wav=reference,
                               ref_text=p.get("ref_text") or None)
        groups.setdefault(str(p.get("backend") or "qwen3-1.7b"), []).append((i, req))

    for name, items in groups.items():
        started = clock()
        try:
            results = backend_for(name).synthesize_batch([req for _, req in items])
        except Exception as exc:  # backend missing or crashed: every job of the group fails, none hang
            log.exception("backend %s failed a batch of %d", name, len(items))
            results = [BackendError("backend_unavailable", f"{name}: {exc}")] * len(items)
        elapsed_ms = int((clock() - started) * 1000)
        for (i, _), result in zip(items, results):
            body = bodies[i]
            if isinstance(result, BackendError):
                body.update(error=result.reason, error_code=result.code, synthesis_ms=elapsed_ms)
                continue
            wav = encode_wav(result.samples, result.sample_rate)
            seconds = float(result.audio_seconds)
            body.update(wav_b64=base64.b64encode(wav).decode("ascii"), synthesis_ms=elapsed_ms,
                        audio_seconds=round(seconds, 3),
                        rtf=round(elapsed_ms / 1000 / seconds, 4) if seconds > 0 else None)

    sent = []
    for i, p in enumerate(payloads):
        body = bodies[i]
        status = post_with_retry(post, str(p["callback_url"]), body, str(p.get("callback_secret", "")), sleep=sleep)
        if status is None or status >= 300:
            log.error("callback for job %s not accepted (last status %s)", body["job_id"], status)
        sent.append(body)
    return sent


def httpx_fetch(url: str) -> bytes:
    """GET a presigned URL."""
    import httpx

    resp = httpx.get(url, timeout=30.0, follow_redirects=True)
    resp.raise_for_status()
    return resp.content


def httpx_post(url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
    """POST JSON and return the status code."""
    import httpx

    return httpx.post(url, json=body, headers=headers, timeout=60.0).status_code


def download_weights() -> None:
    """Image build step: pull both Base checkpoints from the Hugging Face hub into /models."""
    from huggingface_hub import snapshot_download

    for name, repo in CHECKPOINTS.items():
        snapshot_download(repo_id=repo, local_dir=str(model_dir(name)))


# -- Modal wiring (only where modal is installed) ------------------------------------------------

try:
    import modal
except ImportError:  # dev machines and CI: the core above stays importable and testable
    modal = None

if modal is not None:
    _ROOT = Path(__file__).resolve().parents[1]
    image = (
        modal.Image.debian_slim(python_version="3.11")
        .apt_install("sox", "libsndfile1", "ffmpeg")
        .pip_install(*TORCH_PAIR, index_url=TORCH_INDEX)
        .pip_install(
            "transformers==4.57.3", "accelerate==1.12.0", "librosa", "soundfile", "sox", "onnxruntime",
            "einops", "safetensors", "huggingface_hub", "hf_transfer", "httpx==0.28.*", "numpy==2.*",
            "pydantic==2.*", "pydantic-settings==2.*", "structlog==25.*",
        )
        # --no-deps keeps gradio (the demo UI) out of the image.
        .run_commands("pip install --no-deps qwen-tts==0.1.1")
        .env({"HF_HUB_ENABLE_HF_TRANSFER": "1", "TOKENIZERS_PARALLELISM": "false"})
        # Weights baked at build time: a cold container loads from local disk instead of the hub.
        .run_function(download_weights, timeout=3600)
        .add_local_dir(str(_ROOT / "libs" / "common" / "src" / "timbre_common"), "/root/timbre_common")
        .add_local_dir(str(_ROOT / "gpu_worker" / "src" / "timbre_gpu_worker"), "/root/timbre_gpu_worker")
    )

    app = modal.App(APP_NAME, image=image)

    @app.cls(
        gpu=os.environ.get("TIMBRE_MODAL_GPU", "A100"),
        scaledown_window=int(os.environ.get("TIMBRE_MODAL_SCALEDOWN_S", "300")),
        min_containers=int(os.environ.get("TIMBRE_MODAL_MIN_CONTAINERS", "0")),
        timeout=600,
    )
    class Synthesizer:
        """One container: both Qwen3 backends loaded once, jobs batched by Modal."""

        @modal.enter()
        def load(self) -> None:
            from timbre_gpu_worker.backends.qwen3 import Qwen3Backend

            self.backends = {}
            for name in CHECKPOINTS:
                backend = Qwen3Backend(name, model_dir(name), device="cuda:0", dtype="bfloat16")
                if backend.available():
                    backend.load()
                    self.backends[name] = backend

        def backend_for(self, name: str) -> Any:
            if name not in self.backends:
                raise RuntimeError(f"backend {name} is not in this image")
            return self.backends[name]

        # Calls arriving within wait_ms share one synthesize_batch; callers still spawn one payload each.
        @modal.batched(max_batch_size=int(os.environ.get("TIMBRE_MODAL_MAX_BATCH", "8")), wait_ms=150)
        def synthesize(self, payload: list[dict]) -> list[dict]:
            sent = process_jobs(payload, self.backend_for, httpx_fetch, httpx_post)
            # The gateway has the audio already; return only the bookkeeping.
            return [{k: v for k, v in body.items() if k != "wav_b64"} for body in sent]
