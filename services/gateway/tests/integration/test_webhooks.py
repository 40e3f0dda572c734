"""Webhook adapters against the real things: the repository on PostgreSQL with the gateway's migrations, and the
HTTP sender against a local receiver (answers, redirects not followed, timeouts, re-checked targets)."""
from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from timbre_common.contracts import utcnow
from timbre_common.db import create_pool, migrate
from timbre_common.testing import LoopbackServer
from timbre_gateway.bootstrap import MIGRATIONS
from timbre_gateway.webhooks.handlers import DeliveryError
from timbre_gateway.webhooks.repository import WebhookRepository
from timbre_gateway.webhooks.targets import parse_policy
from timbre_gateway.webhooks.transport import HttpSender


@pytest.fixture
async def repo(database_url: str, pg_schema: str):
    pool = await create_pool(database_url, schema=pg_schema)
    await migrate(pool, pg_schema, MIGRATIONS)
    yield WebhookRepository(pool)
    await pool.close()


async def _endpoint(repo: WebhookRepository, account: str, events: list[str], url: str = "https://a.example/h"):
    row = await repo.create_endpoint(account_id=account, url=url, events=events, description=None,
                                     secret="whsec_" + uuid.uuid4().hex)
    assert row is not None
    return row


async def test_one_delivery_per_event_and_endpoint_and_one_claim_per_attempt(repo: WebhookRepository) -> None:
    account = str(uuid.uuid4())
    hook = await _endpoint(repo, account, ["job.ready"])
    assert await repo.create_endpoint(account_id=account, url="https://a.example/h", events=["job.ready"],
                                      description=None, secret="whsec_x") is None  # one endpoint per URL
    made = await repo.create_deliveries(event_id="e1", event_type="job.ready", account_id=account, payload="{}",
                                        endpoints=[hook])
    again = await repo.create_deliveries(event_id="e1", event_type="job.ready", account_id=account, payload="{}",
                                         endpoints=[hook])
    assert len(made) == 1 and again == []
    delivery_id = str(made[0]["delivery_id"])
    claims = await asyncio.gather(*(repo.claim_attempt(delivery_id, 0) for _ in range(5)))
    assert sum(c is not None for c in claims) == 1
    await repo.record_attempt(delivery_id=delivery_id, attempt=1, started_at=utcnow(), duration_ms=5, status_code=500,
                              error="HTTP 500", response="no", outcome="pending",
                              next_attempt_at=utcnow() + timedelta(seconds=30))
    [listed] = await repo.list_deliveries(account, str(hook["webhook_id"]), limit=10)
    assert listed["status"] == "pending" and listed["attempts"] == 1 and listed["last_status"] == 500
    assert await repo.claim_attempt(delivery_id, 0) is None  # a stale copy of the first message


async def test_per_request_targets_and_rotation(repo: WebhookRepository) -> None:
    account, job = str(uuid.uuid4()), str(uuid.uuid4())
    subscribed = await _endpoint(repo, account, ["job.ready"], "https://a.example/all")
    named = await _endpoint(repo, account, ["voice.deleted"], "https://a.example/one")
    await repo.attach_job(job, str(named["webhook_id"]), account)
    ids = {str(r["webhook_id"]) for r in await repo.endpoints_for(account, "job.ready", job)}
    assert ids == {str(subscribed["webhook_id"]), str(named["webhook_id"])}
    other_job = {str(r["webhook_id"]) for r in await repo.endpoints_for(account, "job.ready", str(uuid.uuid4()))}
    assert other_job == {str(subscribed["webhook_id"])}
    await repo.rotate_secret(account, str(named["webhook_id"]), "whsec_new", grace_s=60)
    assert await repo.signing_secrets(str(named["webhook_id"])) == ["whsec_new", named["secret"]]
    await repo.rotate_secret(account, str(named["webhook_id"]), "whsec_newer", grace_s=0)
    assert await repo.signing_secrets(str(named["webhook_id"])) == ["whsec_newer"]


async def test_purge_keeps_only_the_farewell_until_it_ends(repo: WebhookRepository) -> None:
    account = str(uuid.uuid4())
    wants = await _endpoint(repo, account, ["account.purged"], "https://a.example/bye")
    other = await _endpoint(repo, account, ["job.ready"], "https://a.example/jobs")
    await repo.create_deliveries(event_id="e1", event_type="job.ready", account_id=account, payload="{}",
                                 endpoints=[other])
    made, removed = await repo.purge_account(account_id=account, event_id="p1", payload='{"type":"account.purged"}')
    assert len(made) == 1 and made[0]["secrets_snapshot"] == [wants["secret"]] and removed == 3
    assert await repo.list_endpoints(account) == []
    delivery_id = str(made[0]["delivery_id"])
    assert await repo.claim_attempt(delivery_id, 0) is not None
    await repo.record_attempt(delivery_id=delivery_id, attempt=1, started_at=utcnow(), duration_ms=3,
                              status_code=204, error=None, response="", outcome="delivered", next_attempt_at=None)
    assert await repo.get_delivery(delivery_id) is None
    assert await repo.pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE account_id = $1", account) == 0


async def test_stalled_deliveries_are_found_once_per_sweep(repo: WebhookRepository) -> None:
    account = str(uuid.uuid4())
    hook = await _endpoint(repo, account, ["job.ready"])
    [made] = await repo.create_deliveries(event_id="e1", event_type="job.ready", account_id=account, payload="{}",
                                          endpoints=[hook])
    await repo.pool.execute("UPDATE webhook_deliveries SET next_attempt_at = now() - interval '1 hour' "
                            "WHERE delivery_id = $1", made["delivery_id"])
    assert [r["delivery_id"] for r in await repo.stalled_deliveries(overdue_s=600)] == [made["delivery_id"]]
    assert await repo.stalled_deliveries(overdue_s=600) == []


@pytest.fixture(scope="module")
def receiver():
    async def answer(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "moved":
            return RedirectResponse("http://127.0.0.1:9/elsewhere", status_code=302)
        if name == "slow":
            await asyncio.sleep(5)
        if name == "host":
            return Response(request.headers["host"])
        return Response("x" * 5000 if name == "big" else "fine", status_code=200)

    server = LoopbackServer(Starlette(routes=[Route("/{name}", answer, methods=["POST"])])).start()
    yield server
    server.stop()


async def test_sender_posts_and_keeps_the_first_kib_of_the_answer(receiver) -> None:  # type: ignore[no-untyped-def]
    sender = HttpSender(parse_policy("127.0.0.1/32"), timeout_s=3)
    try:
        assert await sender.post(f"{receiver.url}/ok", {"X-Test": "1"}, b"{}") == (200, "fine")
        status, answer = await sender.post(f"{receiver.url}/big", {}, b"{}")
        assert status == 200 and len(answer) == 1024
        # A redirect is an answer, never followed.
        assert (await sender.post(f"{receiver.url}/moved", {}, b"{}"))[0] == 302
        with pytest.raises(DeliveryError, match="no answer within"):
            await HttpSender(parse_policy("127.0.0.1/32"), timeout_s=0.5).post(f"{receiver.url}/slow", {}, b"{}")
    finally:
        await sender.close()


async def test_sender_connects_to_the_checked_address_under_the_name(receiver) -> None:  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    sender = HttpSender(parse_policy("127.0.0.1/32"), timeout_s=3, resolver=resolve)
    try:
        assert await sender.post(f"http://hooks.local:{receiver.port}/host", {}, b"{}") == \
            (200, f"hooks.local:{receiver.port}")
    finally:
        await sender.close()


async def test_sender_checks_the_target_again_at_each_attempt(receiver) -> None:  # type: ignore[no-untyped-def]
    async def rebound(host: str, port: int) -> list[str]:
        return ["169.254.169.254"]  # the name now points at cloud metadata

    sender = HttpSender(parse_policy("127.0.0.1/32"), timeout_s=3, resolver=rebound)
    try:
        with pytest.raises(DeliveryError, match="webhook_target_refused"):
            await sender.post(f"http://hooks.local:{receiver.port}/ok", {}, b"{}")
        # Registered while private targets were allowed, delivered after they no longer are.
        strict = HttpSender(parse_policy("false"), timeout_s=3)
        with pytest.raises(DeliveryError, match="invalid_webhook_url|webhook_target_refused"):
            await strict.post(f"{receiver.url}/ok", {}, b"{}")
        await strict.close()
    finally:
        await sender.close()
