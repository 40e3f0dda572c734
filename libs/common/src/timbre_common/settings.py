"""Settings shared by every service: broker, database, logging. Fail fast on bad values."""
from __future__ import annotations

import re

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values copied from docs and templates that must never be taken for a secret.
_PLACEHOLDER_WORDS = frozenset(
    {"", "changeme", "change-me", "change_me", "secret", "placeholder", "xxx", "todo", "none", "null", "dummy"}
)
_PLACEHOLDER_RE = re.compile(
    r"^(?:(?:sk|rk|pk)_(?:test|live)_|whsec_|price_)?(?:x+|\.\.\.|changeme|placeholder|your[_-].*|<.*>|\*+)$",
    re.IGNORECASE,
)


def is_placeholder(value: str) -> bool:
    """True for an empty value or one that only looks like a secret (`sk_test_xxx`, `changeme`, `<key>`...)."""
    v = value.strip()
    return v.lower() in _PLACEHOLDER_WORDS or bool(_PLACEHOLDER_RE.match(v)) or "changeme" in v.lower()


def require_real_secret(name: str, value: SecretStr | None, *, env: str) -> None:
    """Refuse an empty or placeholder secret outside development."""
    raw = value.get_secret_value() if value is not None else ""
    if env != "dev" and is_placeholder(raw):
        raise ValueError(f"{name} must be set to a real secret when TIMBRE_ENV={env}")


MIN_CALLBACK_SECRET_CHARS = 32


def require_callback_secret(value: SecretStr | None, *, env: str) -> None:
    """MODAL_CALLBACK_SECRET keys every job's callback token: outside development, a real one of 32+ characters."""
    require_real_secret("MODAL_CALLBACK_SECRET", value, env=env)
    raw = value.get_secret_value() if value is not None else ""
    if env != "dev" and len(raw.strip()) < MIN_CALLBACK_SECRET_CHARS:
        raise ValueError(f"MODAL_CALLBACK_SECRET must hold at least {MIN_CALLBACK_SECRET_CHARS} characters "
                         f"when TIMBRE_ENV={env}")


class CommonSettings(BaseSettings):
    """What every Timbre process reads from the environment."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    timbre_env: str = Field(default="dev", description="dev | test | prod")
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/timbre")
    # Prefix of every exchange and queue: lets several deployments (or test runs) share a broker.
    bus_namespace: str = "timbre"
    rpc_timeout_s: float = 30.0
    # Work orders a backend's queue holds before it refuses more; the same value in every service.
    work_queue_max_length: int = Field(default=10_000, gt=0)
    log_level: str = "INFO"
    # Prometheus metrics on a port of the process's own (off unless set; the gateway also serves /metrics on
    # its API port). Off loopback they need METRICS_SECRET as a bearer token.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_secret: SecretStr = SecretStr("")

    @model_validator(mode="after")
    def _metrics_exposure(self) -> CommonSettings:
        loopback = self.metrics_host in ("127.0.0.1", "localhost", "::1") or self.metrics_host.startswith("127.")
        if self.metrics_port and not loopback and is_placeholder(self.metrics_secret.get_secret_value()):
            raise ValueError("METRICS_HOST off loopback needs METRICS_SECRET (Prometheus sends it as a bearer token)")
        return self

    @field_validator("bus_namespace")
    @classmethod
    def _namespace_is_safe(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("BUS_NAMESPACE may hold letters, digits, '-', '_' and '.' only")
        return value
