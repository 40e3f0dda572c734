"""Settings of the gateway."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr, model_validator

from timbre_common.settings import CommonSettings, require_real_secret


class GatewaySettings(CommonSettings):
    db_schema: ClassVar[str] = "gateway"
    host: str = "127.0.0.1"
    port: int = 8000
    # Gates POST/GET/DELETE /v1/keys and the admin routes.
    admin_secret: SecretStr = SecretStr("")
    # Authenticates remote GPU workers (Modal) on POST /v1/jobs/{id}/complete.
    modal_callback_secret: SecretStr = SecretStr("")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    max_text_chars: int = 5000
    max_upload_bytes: int = 20 * 1024 * 1024
    # Request body caps, enforced before authentication (uploads: max_upload_bytes plus the multipart fields).
    max_json_body_bytes: int = Field(default=1024 * 1024, gt=0)
    # A base64 WAV of the longest synthesis (5000 chars, ~6 min of 24 kHz 16-bit mono) is ~23 MB.
    max_callback_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # Stripe's event bodies are a few KiB.
    max_webhook_body_bytes: int = Field(default=1024 * 1024, gt=0)
    # Per-key defaults; a key may carry its own.
    rate_limit_per_minute: int = 120
    max_concurrent_requests: int = 16
    idempotency_ttl_s: int = 24 * 3600
    # A checkout's API key plaintext nobody collected is erased after this long (CHECKOUT_KEY_TTL_S) ...
    checkout_key_ttl_s: float = Field(default=24 * 3600, gt=0)
    # ... by the success page's read, or by a sweep this often, whichever comes first.
    gateway_sweep_interval_s: float = Field(default=300.0, gt=0)
    # An in-flight request's concurrency slot lapses after this unless renewed, so a crashed replica frees it.
    concurrency_lease_s: float = 120.0
    # How long DELETE /v1/account waits for every service to confirm before answering 202.
    purge_wait_s: float = 10.0
    # A backend is advertised while a worker's heartbeat is younger than this many intervals.
    heartbeat_grace: float = 3.0
    # Streamed synthesis: how long to wait for the first piece (the job may queue behind others), between
    # pieces once audio flows (longer and the worker is taken for dead), and for a piece missing in the order.
    stream_start_timeout_s: float = Field(default=120.0, gt=0)
    stream_idle_timeout_s: float = Field(default=20.0, gt=0)
    stream_gap_timeout_s: float = Field(default=3.0, gt=0)

    @model_validator(mode="after")
    def _secrets(self) -> GatewaySettings:
        require_real_secret("ADMIN_SECRET", self.admin_secret, env=self.timbre_env)
        return self
