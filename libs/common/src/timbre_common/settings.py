"""Settings shared by every service: broker, database, logging. Fail fast on bad values."""
from __future__ import annotations

import re

from pydantic import Field, SecretStr, field_validator
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

    @field_validator("bus_namespace")
    @classmethod
    def _namespace_is_safe(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("BUS_NAMESPACE may hold letters, digits, '-', '_' and '.' only")
        return value
