"""Client webhooks with fakes: signatures, the SSRF guard on targets, the delivery schedule and its outcomes."""
from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest

from timbre_common.contracts import utcnow
from timbre_common.contracts.synthesis import JobReady
from timbre_common.contracts.webhooks import WebhookDeliveryDue
from timbre_common.testing import envelope
from timbre_gateway.webhooks import domain, handlers
from timbre_gateway.webhooks.targets import TargetRefused, check_target, parse_policy, pinned_url


def test_signature_has_one_v1_per_secret_over_timestamp_and_body() -> None:
    header = domain.sign(b'{"a":1}', ["whsec_new", "whsec_old"], 1700000000)
    parts = header.split(",")
    assert parts[0] == "t=1700000000"
    expected = [hmac.new(s.encode(), b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
                for s in ("whsec_new", "whsec_old")]
    assert [p.removeprefix("v1=") for p in parts[1:]] == expected


def test_schedule_and_hops() -> None:
    schedule = domain.parse_schedule("1, 5,30")
    assert [domain.next_delay(schedule, n) for n in (1, 2, 3, 4)] == [1, 5, 30, None]
    with pytest.raises(ValueError):
        domain.parse_schedule("1,-2")
    tiers = (1, 5, 30, 300, 1800)
    assert domain.hop_delay(7200, tiers) == 1800
    assert domain.hop_delay(45, tiers) == 30
    assert domain.hop_delay(0.7, tiers) == 1


def _resolver(mapping: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        if host not in mapping:
            raise OSError("Name or service not known")
        return mapping[host]
    return resolve


DNS = _resolver({"hooks.example.com": ["93.184.216.34"], "rebind.example.com": ["93.184.216.34", "10.0.0.7"],
                 "meta.example.com": ["169.254.169.254"], "v6.example.com": ["::1"],
                 "mapped.example.com": ["::ffff:127.0.0.1"], "nat64.example.com": ["64:ff9b::a00:1"],
                 "sixtofour.example.com": ["2002:a9fe:a9fe::1"]})


async def test_public_https_target_is_accepted() -> None:
    target, addresses = await check_target("https://hooks.example.com/timbre", parse_policy("false"), DNS)
    assert [str(a) for a in addresses] == ["93.184.216.34"]
    assert pinned_url(target, addresses[0]) == "https://93.184.216.34:443/timbre"


@pytest.mark.parametrize("url, code", [
    ("http://hooks.example.com/x", "invalid_webhook_url"),
    ("https://user:pw@hooks.example.com/x", "invalid_webhook_url"),
    ("ftp://hooks.example.com/x", "invalid_webhook_url"),
    ("https://127.0.0.1/x", "webhook_target_refused"),
    ("https://10.1.2.3/x", "webhook_target_refused"),
    ("https://[::1]/x", "webhook_target_refused"),
    ("https://169.254.169.254/latest/meta-data", "webhook_target_refused"),
    ("https://meta.example.com/x", "webhook_target_refused"),
    ("https://rebind.example.com/x", "webhook_target_refused"),
    ("https://v6.example.com/x", "webhook_target_refused"),
    ("https://mapped.example.com/x", "webhook_target_refused"),
    ("https://nat64.example.com/x", "webhook_target_refused"),
    ("https://sixtofour.example.com/x", "webhook_target_refused"),
    ("https://[fd00::1]/x", "webhook_target_refused"),
    ("https://100.64.0.1/x", "webhook_target_refused"),
    ("https://0.0.0.0/x", "webhook_target_refused"),
    ("https://nowhere.example.com/x", "webhook_target_unresolvable"),
])
async def test_internal_targets_are_refused(url: str, code: str) -> None:
    with pytest.raises(TargetRefused) as refused:
        await check_target(url, parse_policy("false"), DNS)
    assert refused.value.code == code


async def test_private_targets_allowed_only_where_configured() -> None:
    loopback = parse_policy("127.0.0.1/32")
    await check_target("http://127.0.0.1:9000/hook", loopback, DNS)
    with pytest.raises(TargetRefused):
        await check_target("https://10.1.2.3/x", loopback, DNS)
    with pytest.raises(TargetRefused):  # a public name still needs https
        await check_target("http://hooks.example.com/x", loopback, DNS)
    await check_target("http://10.1.2.3/x", parse_policy("true"), DNS)


class FakeWebhooks:
    """The WebhookRepository methods the handlers use, on dicts."""

    def __init__(self) -> None:
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.deliveries: dict[str, dict[str, Any]] = {}
        self.attempts: list[dict[str, Any]] = []

    def add_endpoint(self, account_id: str, events: list[str]) -> dict[str, Any]:
        row = {"webhook_id": str(uuid.uuid4()), "account_id": account_id, "url": "https://hooks.example.com/x",
               "events": events, "secret": "whsec_s", "previous_secret": None}
        self.endpoints[row["webhook_id"]] = row
        return row

    async def endpoints_for(self, account_id: str, event_type: str, job_id: str | None = None) -> list[dict]:
        return [e for e in self.endpoints.values() if e["account_id"] == account_id and event_type in e["events"]]

    async def create_deliveries(self, *, event_id: str, event_type: str, account_id: str, payload: str,
                                endpoints: list[dict], **_: Any) -> list[dict]:
        made = []
        for e in endpoints:
            if any(d["event_id"] == event_id and d["webhook_id"] == e["webhook_id"] for d in self.deliveries.values()):
                continue
            row = {"delivery_id": str(uuid.uuid4()), "event_id": event_id, "event_type": event_type,
                   "webhook_id": e["webhook_id"], "account_id": account_id, "url": e["url"], "payload": payload,
                   "secrets_snapshot": None, "status": "pending", "attempts": 0}
            self.deliveries[row["delivery_id"]] = row
            made.append(row)
        return made

    async def get_delivery(self, delivery_id: str) -> dict | None:
        return self.deliveries.get(delivery_id)

    async def claim_attempt(self, delivery_id: str, attempts_made: int) -> dict | None:
        row = self.deliveries.get(delivery_id)
        if row is None or row["status"] != "pending" or row["attempts"] != attempts_made:
            return None
        row["attempts"] += 1
        return dict(row)

    async def signing_secrets(self, webhook_id: str) -> list[str] | None:
        e = self.endpoints.get(webhook_id)
        return [e["secret"]] if e else None

    async def record_attempt(self, *, delivery_id: str, outcome: str, **fields: Any) -> None:
        self.deliveries[delivery_id]["status"] = outcome
        self.attempts.append({"delivery_id": delivery_id, "outcome": outcome, **fields})


class FakeScheduler:
    def __init__(self) -> None:
        self.scheduled: list[WebhookDeliveryDue] = []
        self.deferred: list[WebhookDeliveryDue] = []

    async def schedule(self, due: WebhookDeliveryDue) -> None:
        self.scheduled.append(due)

    async def later(self, due: WebhookDeliveryDue) -> None:
        self.deferred.append(due)


class FakeSender:
    def __init__(self, status: int) -> None:
        self.status = status
        self.sent: list[tuple[str, dict[str, str], bytes]] = []

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        self.sent.append((url, headers, body))
        return self.status, "answer"


def _job_ready(account_id: str) -> JobReady:
    return JobReady(job_id=str(uuid.uuid4()), account_id=account_id, voice_id="v", backend="embedded", characters=5,
                    audio_key="k")


async def test_an_event_becomes_one_delivery_per_subscribed_endpoint_once() -> None:
    repo, scheduler = FakeWebhooks(), FakeScheduler()
    account = str(uuid.uuid4())
    wants = repo.add_endpoint(account, ["job.ready"])
    repo.add_endpoint(account, ["voice.deleted"])
    repo.add_endpoint(str(uuid.uuid4()), ["job.ready"])  # another tenant's
    event, env = _job_ready(account), envelope()
    await handlers.on_job_ready(event, envelope=env, webhooks=repo, scheduler=scheduler)  # type: ignore[arg-type]
    await handlers.on_job_ready(event, envelope=env, webhooks=repo, scheduler=scheduler)  # type: ignore[arg-type]
    assert [d["webhook_id"] for d in repo.deliveries.values()] == [wants["webhook_id"]]
    assert len(scheduler.scheduled) == 1
    body = json.loads(next(iter(repo.deliveries.values()))["payload"])
    assert body["type"] == "job.ready" and body["data"]["job_id"] == event.job_id and body["id"] == env.message_id


async def _deliver(repo: FakeWebhooks, scheduler: FakeScheduler, sender: FakeSender, due: WebhookDeliveryDue,
                   slots: handlers.EndpointSlots | None = None) -> str:
    return await handlers.on_delivery_due(due, envelope=envelope(), webhooks=repo, scheduler=scheduler,  # type: ignore[arg-type]
                                          sender=sender, slots=slots or handlers.EndpointSlots(4), schedule=(1.0, 2.0))


async def test_failing_endpoint_is_retried_on_schedule_then_parked() -> None:
    repo, scheduler, sender = FakeWebhooks(), FakeScheduler(), FakeSender(500)
    account = str(uuid.uuid4())
    repo.add_endpoint(account, ["job.ready"])
    await handlers.on_job_ready(_job_ready(account), envelope=envelope(), webhooks=repo,  # type: ignore[arg-type]
                                scheduler=scheduler)
    outcomes = []
    for _ in range(3):
        due = scheduler.scheduled.pop()
        outcomes.append(await _deliver(repo, scheduler, sender, due.model_copy(update={"due_at": utcnow()})))
    assert outcomes == ["pending", "pending", "parked"]
    assert not scheduler.scheduled
    assert [h[domain.ATTEMPT_HEADER] for _, h, _ in sender.sent] == ["1", "2", "3"]
    assert len({h[domain.EVENT_ID_HEADER] for _, h, _ in sender.sent}) == 1
    # A copy of an old message (a duplicate, a stale hop) changes nothing.
    stale = WebhookDeliveryDue(delivery_id=next(iter(repo.deliveries)), account_id=account, attempt=1, due_at=utcnow())
    assert await _deliver(repo, scheduler, sender, stale) == "stale"
    assert len(sender.sent) == 3


async def test_not_yet_due_hops_again_and_busy_endpoint_defers_without_an_attempt() -> None:
    repo, scheduler, sender = FakeWebhooks(), FakeScheduler(), FakeSender(204)
    account = str(uuid.uuid4())
    endpoint = repo.add_endpoint(account, ["job.ready"])
    await handlers.on_job_ready(_job_ready(account), envelope=envelope(), webhooks=repo,  # type: ignore[arg-type]
                                scheduler=scheduler)
    due = scheduler.scheduled.pop()
    later = due.model_copy(update={"due_at": utcnow() + timedelta(seconds=60)})
    assert await _deliver(repo, scheduler, sender, later) == "waiting"
    assert scheduler.scheduled == [later]
    slots = handlers.EndpointSlots(1)
    assert slots.try_acquire(endpoint["webhook_id"])
    assert await _deliver(repo, scheduler, sender, due, slots) == "deferred"
    assert scheduler.deferred == [due] and not sender.sent
    slots.release(endpoint["webhook_id"])
    assert await _deliver(repo, scheduler, sender, due, slots) == "delivered"
    _, headers, body = sender.sent[0]
    t = headers[domain.SIGNATURE_HEADER].split(",")[0].removeprefix("t=")
    assert headers[domain.SIGNATURE_HEADER] == domain.sign(body, ["whsec_s"], int(t))


async def test_job_failed_and_voice_deleted_carry_their_fields() -> None:
    from timbre_common.contracts.synthesis import JobFailed
    from timbre_common.contracts.voices import VoiceDeleted

    repo, scheduler = FakeWebhooks(), FakeScheduler()
    account = str(uuid.uuid4())
    repo.add_endpoint(account, ["job.failed", "voice.deleted"])
    await handlers.on_job_failed(JobFailed(job_id="j1", account_id=account, code="synthesis_failed", reason="boom"),
                                 envelope=envelope(), webhooks=repo, scheduler=scheduler)  # type: ignore[arg-type]
    await handlers.on_voice_deleted(VoiceDeleted(voice_id="v1", account_id=account), envelope=envelope(),
                                    webhooks=repo, scheduler=scheduler)  # type: ignore[arg-type]
    bodies = {b["type"]: b["data"] for b in (json.loads(d["payload"]) for d in repo.deliveries.values())}
    assert bodies == {"job.failed": {"job_id": "j1", "code": "synthesis_failed", "reason": "boom"},
                      "voice.deleted": {"voice_id": "v1"}}
