"""BillingSettings: off by default, fail fast on missing or placeholder secrets when on."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from timbre_billing.settings import BillingSettings
from timbre_common.settings import is_placeholder

GOOD = {
    "billing": "on",
    "stripe_secret_key": "sk_test_51Hreal0123456789",
    "stripe_webhook_secrets": "whsec_abc123, whsec_def456",
    "stripe_price_id": "price_1Hobby",
}


def test_off_needs_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BILLING", raising=False)
    settings = BillingSettings()
    assert not settings.enabled and settings.webhook_secrets() == []


def test_on_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GOOD.items():
        monkeypatch.setenv(key.upper(), value)
    monkeypatch.setenv("APP_BASE_URL", "https://timbre.example/")
    settings = BillingSettings()
    assert settings.enabled
    assert settings.webhook_secrets() == ["whsec_abc123", "whsec_def456"]
    assert settings.app_base_url == "https://timbre.example"
    assert "sk_test_51Hreal" not in repr(settings)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stripe_secret_key", ""),
        ("stripe_secret_key", "changeme"),
        ("stripe_secret_key", "sk_test_xxx"),
        ("stripe_secret_key", "sk_live_..."),
        ("stripe_webhook_secrets", ""),
        ("stripe_webhook_secrets", "whsec_abc123,whsec_xxx"),
        ("stripe_price_id", ""),
    ],
)
def test_on_refuses_missing_or_placeholder(field: str, value: str) -> None:
    with pytest.raises(ValidationError) as info:
        BillingSettings(**{**GOOD, field: value})
    assert field.upper() in str(info.value)


def test_error_never_quotes_a_secret() -> None:
    with pytest.raises(ValidationError) as info:
        BillingSettings(**{**GOOD, "stripe_price_id": "changeme"})
    assert "sk_test_51Hreal0123456789" not in str(info.value)
    assert "whsec_abc123" not in str(info.value)


def test_placeholder_detection_keeps_real_values() -> None:
    assert not is_placeholder("sk_test_51Hreal0123456789")
    assert not is_placeholder("whsec_0a1b2c3d")
    assert is_placeholder("your-secret-here") and is_placeholder("<sk_live>")
