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
    # A batch still running after its length-based time (timbre_common.catalogue.expected_synthesis_seconds
    # of its characters), or after this cap, fails the jobs it has not delivered; they are retried.
    batch_timeout_s: float = 900.0
    # Texts up to this many characters run in their own lane on backends that run lanes side by side.
    short_lane_chars: int = 200
    heartbeat_interval_s: float = 10.0
    max_reference_bytes: int = 25 * 1024 * 1024
    load_on_start: bool = True
