"""Settings of the GPU worker."""
from __future__ import annotations

from pathlib import Path

from timbre_common.settings import CommonSettings


class WorkerSettings(CommonSettings):
    # Which backends this worker tries to load; those that cannot run here are not advertised.
    backends: str = "embedded,qwen3-1.7b,qwen3-0.6b"
    qwen3_1_7b_model_dir: Path | None = None
    qwen3_0_6b_model_dir: Path | None = None
    device: str = "auto"
    max_batch: int = 8
    # How long the first job of a batch waits for company before the batch runs.
    batch_window_ms: int = 25
    # A batch still running after this fails its jobs, which are retried.
    batch_timeout_s: float = 900.0
    heartbeat_interval_s: float = 10.0
    max_reference_bytes: int = 25 * 1024 * 1024
    load_on_start: bool = True
