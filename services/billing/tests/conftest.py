"""Billing test fixtures: a fresh PostgreSQL schema per test, the fake Stripe server, settings."""
from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from timbre_billing.adapters.repository import BillingRepository
from timbre_billing.adapters.stripe_gateway import StripeGateway
from timbre_billing.settings import BillingSettings
from timbre_common.db import create_pool, drop_schema, migrate
from timbre_common.testing import load_module

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
DSN = os.environ.get("BILLING_TEST_DATABASE_URL") or os.environ.get(
    "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
WEBHOOK_SECRETS = ("whsec_current_a1b2c3", "whsec_previous_d4e5f6")


# Tests are imported with --import-mode=importlib, so sibling helpers are loaded by path.
fake_stripe = load_module("timbre_billing_tests_fake_stripe", Path(__file__).with_name("fake_stripe.py"))


class FakeStripe:
    """The running fake plus webhook helpers, handed to tests."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.state = server.state
        self.url: str = server.url
        self.build_event = fake_stripe.build_event
        self.sign_header = fake_stripe.sign_header

    def reset(self) -> None:
        for table in (self.state.customers, self.state.sessions, self.state.subscriptions):
            table.clear()
        self.state.requests.clear()

    def signed(self, event_type: str, obj: dict[str, Any], *, secret: str = WEBHOOK_SECRETS[0],
               created: int | None = None, timestamp: int | None = None,
               event_id: str | None = None) -> tuple[bytes, str]:
        """A Stripe event body and its Stripe-Signature header."""
        body = self.build_event(event_type, obj, created=created, event_id=event_id)
        return body, self.sign_header(body, secret, timestamp)


@pytest.fixture(scope="session")
def fake_stripe_server() -> Iterator[Any]:
    server = fake_stripe.FakeStripeServer().start()
    yield server
    server.stop()


@pytest.fixture
def stripe_fake(fake_stripe_server: Any) -> FakeStripe:
    fake = FakeStripe(fake_stripe_server)
    fake.reset()
    return fake


@pytest.fixture
def settings_on(stripe_fake: FakeStripe) -> BillingSettings:
    return BillingSettings(
        billing="on",
        stripe_secret_key="sk_test_fakekey123",
        stripe_webhook_secrets=",".join(WEBHOOK_SECRETS),
        stripe_price_id="price_hobby",
        stripe_api_base=stripe_fake.url,
        app_base_url="https://timbre.test",
        plan_character_quota=1000,
    )


@pytest.fixture
def settings_off() -> BillingSettings:
    return BillingSettings(billing="off", plan_character_quota=1000)


@pytest.fixture
async def gateway(settings_on: BillingSettings) -> AsyncIterator[StripeGateway]:
    gw = StripeGateway(
        settings_on.stripe_secret_key.get_secret_value(),
        price_id=settings_on.stripe_price_id,
        api_base=settings_on.stripe_api_base,
        max_network_retries=0,
    )
    yield gw
    await gw.aclose()


@pytest.fixture
def database_url() -> str:
    return DSN


@pytest.fixture
def schema() -> str:
    return f"billing_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def pool(schema: str) -> AsyncIterator[asyncpg.Pool]:
    try:
        pool = await create_pool(DSN, schema=schema, min_size=1, max_size=3)
    except (OSError, asyncpg.PostgresError) as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL unreachable in CI at the configured URL: {type(exc).__name__}")
        pytest.skip(f"PostgreSQL unreachable ({type(exc).__name__}); set BILLING_TEST_DATABASE_URL")
    await migrate(pool, schema, MIGRATIONS)
    yield pool
    await pool.close()
    await drop_schema(DSN, schema)


@pytest.fixture
def repository(pool: asyncpg.Pool) -> BillingRepository:
    return BillingRepository(pool)


@pytest.fixture
def stripe_sign() -> Any:
    """fake_stripe.sign_header, without starting the server."""
    return fake_stripe.sign_header
