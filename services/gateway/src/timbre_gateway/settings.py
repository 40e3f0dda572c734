"""Settings of the gateway."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr, field_validator, model_validator

from timbre_common.settings import CommonSettings, require_callback_secret, require_real_secret

from .webhooks.domain import parse_schedule
from .webhooks.targets import parse_policy


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
    # POST /v1/checkout per client address (it is unauthenticated and each call costs Stripe requests).
    checkout_rate_per_minute: int = Field(default=10, gt=0)
    # Seals checkout keys at rest (AES-GCM); unset, a key is derived from ADMIN_SECRET under its own label.
    checkout_key_secret: SecretStr = SecretStr("")
    # An in-flight Idempotency-Key claim is a lease renewed while its request runs; a crashed replica's claim
    # lapses after this. Unset: just above the longest RPC wait (RPC_TIMEOUT_S + 5 s).
    idempotency_lease_s: float | None = Field(default=None, gt=0)
    # A checkout's API key plaintext nobody collected is erased after this long (CHECKOUT_KEY_TTL_S) ...
    checkout_key_ttl_s: float = Field(default=24 * 3600, gt=0)
    # ... by the success page's read, or by a sweep this often, whichever comes first.
    gateway_sweep_interval_s: float = Field(default=300.0, gt=0)
    # An in-flight request's concurrency slot lapses after this unless renewed, so a crashed replica frees it.
    concurrency_lease_s: float = 120.0
    # A purge some service has not confirmed this long after it was asked for ends `failed` (PURGE_DEADLINE_S).
    purge_deadline_s: float = Field(default=3600.0, gt=0)
    # How long DELETE /v1/account waits for every service to confirm before answering 202.
    purge_wait_s: float = 10.0
    # How often queue and dead-letter depths are read for /metrics (QUEUE_POLL_INTERVAL_S).
    queue_poll_interval_s: float = Field(default=15.0, gt=0)
    # A backend is advertised while a worker's heartbeat is younger than this many intervals.
    heartbeat_grace: float = 3.0
    # Streamed synthesis: how long to wait for the first piece (the job may queue behind others), between
    # pieces once audio flows (longer and the worker is taken for dead), and for a piece missing in the order.
    stream_start_timeout_s: float = Field(default=120.0, gt=0)
    stream_idle_timeout_s: float = Field(default=20.0, gt=0)
    stream_gap_timeout_s: float = Field(default=3.0, gt=0)

    # The hot path: cache hits, polls and downloads answered from read models fed by events and from the bucket
    # (read-only), falling back to the services whenever these do not know (READ_MODELS=false: always ask).
    read_models: bool = True
    read_model_max_entries: int = Field(default=100_000, gt=0)
    # Keys held in memory are dropped by account.keys_changed at once; this bounds how long one is kept anyway
    # (a lost event, a change made outside the gateway).
    key_cache_ttl_s: float = Field(default=60.0, ge=0)
    # The bucket storage writes to, read here with storage's own settings (STORAGE_BACKEND, STORAGE_ROOT, S3_*,
    # R2_*).
    storage_backend: str = "fs"
    storage_root: str = "./var/blobs"
    storage_public_url: str = "http://127.0.0.1:8001"
    storage_signing_key: SecretStr | None = None
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_bucket: str | None = None
    r2_account_id: str | None = None
    r2_access_key_id: str | None = None
    r2_secret_access_key: SecretStr | None = None
    r2_bucket_name: str | None = None

    def checkout_sealing_secret(self) -> str:
        """The secret checkout keys are sealed with: CHECKOUT_KEY_SECRET, else ADMIN_SECRET (HKDF separates the
        uses); empty only in development without either."""
        return (self.checkout_key_secret.get_secret_value() or self.admin_secret.get_secret_value())

    # Client webhooks. Private, loopback and link-local targets are refused unless allowed here: `true` (any, for
    # self-hosting; http is then accepted too) or a list of networks (`127.0.0.1/32,10.0.0.0/8`).
    webhook_allow_private: str = "false"
    # Seconds before each retry of a failed delivery (about 24 h in all); after the last one it is parked.
    webhook_retry_schedule_s: str = "10,30,120,600,1800,3600,7200,14400,21600,36000"
    # One attempt (connect, send, the first KiB of the answer) ends after this long.
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # Deliveries in flight to one endpoint; more wait their turn without holding anyone else's.
    webhook_concurrency_per_endpoint: int = Field(default=4, ge=1)
    webhook_max_endpoints: int = Field(default=10, ge=1)

    @field_validator("webhook_allow_private")
    @classmethod
    def _policy_parses(cls, value: str) -> str:
        parse_policy(value)
        return value

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _schedule_parses(cls, value: str) -> str:
        parse_schedule(value)
        return value

    @property
    def idempotency_lease(self) -> float:
        """Seconds an Idempotency-Key claim lasts unless renewed."""
        return self.idempotency_lease_s or self.rpc_timeout_s + 5.0

    @model_validator(mode="after")
    def _secrets(self) -> GatewaySettings:
        require_real_secret("ADMIN_SECRET", self.admin_secret, env=self.timbre_env)
        if self.checkout_key_secret.get_secret_value():
            require_real_secret("CHECKOUT_KEY_SECRET", self.checkout_key_secret, env=self.timbre_env)
        # Unset: no remote worker may call back (the route refuses every token). Set: it keys every job's token.
        if self.modal_callback_secret.get_secret_value():
            require_callback_secret(self.modal_callback_secret, env=self.timbre_env)
        return self
