"""Billing settings from the environment; with BILLING=on, missing or placeholder secrets fail at start."""
from __future__ import annotations

from typing import Literal

from pydantic import SecretStr, field_validator, model_validator

from timbre_common.settings import CommonSettings, is_placeholder


class BillingSettings(CommonSettings):
    """What the billing service reads from the environment."""

    billing: Literal["on", "off"] = "off"
    stripe_secret_key: SecretStr = SecretStr("")
    # Comma-separated: during a rotation Stripe signs with one secret while the other is still configured.
    stripe_webhook_secrets: SecretStr = SecretStr("")
    stripe_price_id: str = ""
    stripe_api_base: str | None = None
    app_base_url: str = "http://127.0.0.1:8000"
    plan_character_quota: int = 500_000
    webhook_tolerance_s: int = 300
    # How long a quota hold counts when neither job.ready nor job.failed ever arrives for it (a lost event):
    # longer than any job can stay pending, short enough that a lost event cannot lock an account for long.
    quota_hold_ttl_s: int = 3600
    # A checkout not paid this long after it started is deleted (its Stripe session expires at the same time,
    # within Stripe's 30 min to 24 h), so unauthenticated checkouts leave no rows behind.
    checkout_token_ttl_s: int = 24 * 3600
    # How often open checkouts are looked at for expiry.
    checkout_sweep_interval_s: float = 300.0
    # How often the quota-hold gauges of /metrics are read.
    hold_stats_interval_s: float = 15.0

    @field_validator("billing", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("app_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("APP_BASE_URL must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("stripe_api_base")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else None

    @field_validator("plan_character_quota", "webhook_tolerance_s", "quota_hold_ttl_s", "checkout_token_ttl_s",
                     "checkout_sweep_interval_s")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be positive")
        return value

    @model_validator(mode="after")
    def _secrets_when_on(self) -> BillingSettings:
        if not self.enabled:
            return self
        problems: list[str] = []
        if is_placeholder(self.stripe_secret_key.get_secret_value()):
            problems.append("STRIPE_SECRET_KEY is missing or a placeholder")
        secrets = self.webhook_secrets()
        if not secrets or any(is_placeholder(s) for s in secrets):
            problems.append("STRIPE_WEBHOOK_SECRETS is missing or holds a placeholder")
        if is_placeholder(self.stripe_price_id):
            problems.append("STRIPE_PRICE_ID is missing or a placeholder")
        if problems:
            # Names only: a ValueError text ends up in logs, so no value is ever quoted.
            raise ValueError("BILLING=on but " + "; ".join(problems))
        return self

    @property
    def enabled(self) -> bool:
        """Whether Stripe billing and quota enforcement are on."""
        return self.billing == "on"

    @property
    def stripe_session_ttl_s(self) -> int:
        """The Checkout Session lifetime: the token's, within what Stripe accepts (30 min to 24 h)."""
        return min(max(self.checkout_token_ttl_s, 1800), 24 * 3600 - 60)

    def webhook_secrets(self) -> list[str]:
        """The accepted webhook signing secrets, in configured order."""
        raw = self.stripe_webhook_secrets.get_secret_value()
        return [s.strip() for s in raw.split(",") if s.strip()]
