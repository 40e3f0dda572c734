"""Account purges end in a final state: `completed`, or `failed` naming the services that never confirmed,
visible to the admin and logged as an alert."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from timbre_common.contracts.accounts import PURGING_SERVICES
from timbre_common.db import create_pool, migrate
from timbre_gateway import handlers
from timbre_gateway.adapters.repository import AccountRepository
from timbre_gateway.bootstrap import MIGRATIONS
from timbre_gateway.http.app import create_app

HOUR = 3600.0


@pytest.fixture
async def accounts(database_url: str, pg_schema: str) -> AsyncIterator[AccountRepository]:
    pool = await create_pool(database_url, schema=pg_schema, min_size=1, max_size=4)
    await migrate(pool, pg_schema, MIGRATIONS)
    yield AccountRepository(pool)
    await pool.close()


async def _purge(accounts: AccountRepository, *, age_s: float, confirmed_by: tuple[str, ...]) -> str:
    purge_id = await accounts.start_purge(str(uuid.uuid4()))
    for service in confirmed_by:
        await accounts.confirm_purge(purge_id, service, 1, PURGING_SERVICES)
    await accounts.pool.execute("UPDATE purges SET requested_at = now() - make_interval(secs => $2) "
                                "WHERE purge_id = $1", purge_id, age_s)
    return purge_id


async def _admin_view(accounts: AccountRepository, purge_id: str) -> dict:
    settings = SimpleNamespace(admin_secret=SecretStr("admin"), max_upload_bytes=1 << 20, max_json_body_bytes=1 << 20,
                               max_callback_body_bytes=1 << 20, max_webhook_body_bytes=1 << 20,
                               modal_callback_secret=SecretStr("s"))
    ctx = SimpleNamespace(settings=settings, accounts=accounts, limiter=None, bus=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://gw") as http:
        r = await http.get(f"/v1/admin/purges/{purge_id}", headers={"Authorization": "Bearer admin"})
    assert r.status_code == 200, r.text
    return r.json()


async def test_an_unconfirmed_purge_past_its_deadline_fails_naming_the_silent_services(accounts):
    overdue = await _purge(accounts, age_s=HOUR + 60, confirmed_by=("gateway", "voices", "storage"))
    young = await _purge(accounts, age_s=60, confirmed_by=("gateway",))
    done = await _purge(accounts, age_s=HOUR + 60, confirmed_by=PURGING_SERVICES)
    with capture_logs() as logs:
        assert await handlers.fail_overdue_purges(accounts=accounts, deadline_s=HOUR) == 1
        assert await handlers.fail_overdue_purges(accounts=accounts, deadline_s=HOUR) == 0  # once
    alerts = [e for e in logs if e["event"] == "purge_failed"]
    assert len(alerts) == 1 and alerts[0]["log_level"] == "error" and alerts[0]["alert"] is True
    assert alerts[0]["purge_id"] == overdue and alerts[0]["missing"] == ["billing", "dispatcher"]

    view = await _admin_view(accounts, overdue)
    assert view["status"] == "failed" and view["missing"] == ["billing", "dispatcher"] and view["failed_at"]
    assert set(view["confirmed"]) == {"gateway", "voices", "storage"}
    pending = await _admin_view(accounts, young)
    assert pending["status"] == "pending" and "voices" in pending["missing"]
    assert (await _admin_view(accounts, done))["status"] == "completed"


async def test_a_failed_purge_is_no_longer_asked_again(accounts):
    purge_id = await _purge(accounts, age_s=HOUR + 60, confirmed_by=())
    before = await accounts.unfinished_purges(older_than_s=60, within_s=10 * HOUR)
    assert purge_id in {str(r["purge_id"]) for r in before}
    await handlers.fail_overdue_purges(accounts=accounts, deadline_s=HOUR)
    after = await accounts.unfinished_purges(older_than_s=60, within_s=10 * HOUR)
    assert purge_id not in {str(r["purge_id"]) for r in after}


async def test_a_late_confirmation_still_completes_a_failed_purge(accounts):
    purge_id = await _purge(accounts, age_s=HOUR + 60, confirmed_by=("gateway", "voices", "storage", "billing"))
    await handlers.fail_overdue_purges(accounts=accounts, deadline_s=HOUR)
    assert (await _admin_view(accounts, purge_id))["status"] == "failed"
    await accounts.confirm_purge(purge_id, "dispatcher", 0, PURGING_SERVICES)
    view = await _admin_view(accounts, purge_id)
    assert view["status"] == "completed" and view["missing"] == []
