"""Settings of the synthesis dispatcher."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr, model_validator

from timbre_common.settings import CommonSettings, require_callback_secret


class DispatcherSettings(CommonSettings):
    db_schema: ClassVar[str] = "dispatch"
    # local: a RabbitMQ work queue drained by gpu_worker; modal: spawn the Modal function.
    executor: str = "local"
    # A job not finished in time after it was handed out is handed out again, up to max attempts. Its time is
    # its characters times its backend's rate (seconds per character), never less than JOB_DEADLINE_S, so a
    # long job is not sent again while its first attempt still runs.
    job_deadline_s: float = 300.0
    job_deadline_per_char_s: dict[str, float] = Field(
        default_factory=lambda: {"embedded": 0.1, "qwen3-1.7b": 0.25, "qwen3-0.6b": 0.2})
    job_max_attempts: int = 3
    # Jobs one account may have pending at once; the next submission is refused with 429.
    max_pending_jobs_per_account: int = Field(default=100, gt=0)
    # Finished jobs (and their text) are deleted this long after they ended.
    job_retention_s: float = Field(default=30 * 24 * 3600, gt=0)
    sweep_interval_s: float = 5.0
    reference_url_ttl_s: int = 3600
    modal_app_name: str = "timbre-gpu-worker"
    modal_class_name: str = "Synthesizer"
    modal_backends: str = "qwen3-1.7b,qwen3-0.6b"
    # Where Modal POSTs results: the gateway's public base URL.
    public_base_url: str = "http://127.0.0.1:8000"
    modal_callback_secret: SecretStr = SecretStr("")
    # Set: spawn by POSTing the payload here instead of through Modal (tests' fake Modal, other hosts).
    modal_spawn_url: str | None = None
    # How often the gateway hears that the Modal backends are on offer.
    modal_heartbeat_interval_s: float = 10.0

    @property
    def modal_backend_names(self) -> list[str]:
        """Backends routed to Modal when EXECUTOR=modal (the rest stay on local workers)."""
        return [b.strip() for b in self.modal_backends.split(",") if b.strip()]

    @model_validator(mode="after")
    def _modal_needs_secret(self) -> DispatcherSettings:
        if self.executor not in ("local", "modal"):
            raise ValueError("EXECUTOR must be 'local' or 'modal'")
        if self.executor == "modal":
            # Checked in development too: a Modal executor always talks to a host outside this machine.
            require_callback_secret(self.modal_callback_secret, env="prod")
        return self
