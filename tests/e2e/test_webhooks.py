"""Client webhooks end to end: a local receiver gets signed job outcomes and verifies them with the SDK; a failing
receiver is retried on the configured schedule and then parked; a slow one holds up nobody else; internal
addresses are refused."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from timbre import NotFoundError, Timbre, webhooks
from timbre.models import WebhookDelivery
from timbre_common.catalogue import SYSTEM_VOICES
from timbre_common.testing import LoopbackServer

from .conftest import Client, running_platform

pytestmark = pytest.mark.e2e
JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")
SLOW_ANSWER_S = 3.0


class Receiver:
    """A webhook receiver on 127.0.0.1: /ok answers 204, /fail 500, /slow 204 after a while."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.lock = threading.Lock()
        self.slow_in_flight = 0
        self.slow_most_in_flight = 0

        async def hook(request: Request) -> Response:
            name = request.path_params["name"]
            body = await request.body()
            entry = {"name": name, "headers": dict(request.headers), "body": body}
            if name == "slow":
                with self.lock:
                    self.slow_in_flight += 1
                    self.slow_most_in_flight = max(self.slow_most_in_flight, self.slow_in_flight)
                try:
                    await asyncio.sleep(SLOW_ANSWER_S)
                finally:
                    with self.lock:
                        self.slow_in_flight -= 1
            with self.lock:
                entry["slow_answered_before"] = sum(1 for r in self.received if r["name"] == "slow")
                self.received.append(entry)
            if name.startswith("fail"):
                return Response("receiver is broken", status_code=500)
            return Response(status_code=204)

        self.server = LoopbackServer(Starlette(routes=[Route("/hooks/{name}", hook, methods=["POST"])]))

    def url(self, name: str) -> str:
        return f"{self.server.url}/hooks/{name}"

    def wait_for(self, name: str, count: int = 1, timeout: float = 90.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = [r for r in self.received if r["name"] == name]
            if len(got) >= count:
                return got
            time.sleep(0.1)
        raise AssertionError(f"{name}: {len(got)} of {count} deliveries within {timeout}s")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.server.start()
    yield r
    r.server.stop()


@pytest.fixture(scope="module")
def platform(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """Loopback 127.0.0.1 allowed (the receiver), retries after 1 s and 1 s, then parked; one delivery in flight
    per endpoint."""
    with running_platform(database_url, amqp_url, tmp_path_factory.mktemp("webhooks"), overrides={
            "WEBHOOK_ALLOW_PRIVATE": "127.0.0.1/32", "WEBHOOK_RETRY_SCHEDULE_S": "1,1", "WEBHOOK_TIMEOUT_S": "10",
            "WEBHOOK_CONCURRENCY_PER_ENDPOINT": "1"}) as c:
        yield c


def _sdk(platform: Client) -> Timbre:
    return Timbre(platform.new_key()["api_key"], base_url=platform.base_url)


def _deliveries(sdk: Timbre, webhook_id: str, until: str, timeout: float = 90.0) -> list[WebhookDelivery]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = sdk.webhooks.deliveries(webhook_id)
        if listed and all(d.status == until for d in listed):
            return listed
        time.sleep(0.3)
    raise AssertionError(f"deliveries not all {until}: {listed}")


def _speak(sdk: Timbre, text: str, **options: str) -> str:
    job = sdk.speech.create(text, voice=JOE.voice_id, **options)
    sdk.jobs.wait(job.job_id)  # type: ignore[union-attr]
    return job.job_id  # type: ignore[union-attr]


def test_internal_targets_and_unregistered_urls_are_refused(platform: Client, receiver: Receiver) -> None:
    sdk = _sdk(platform)
    for url, code in [("https://10.0.0.5/hook", "webhook_target_refused"),
                      ("https://169.254.169.254/latest/meta-data", "webhook_target_refused"),
                      ("http://127.0.0.2:8080/hook", "webhook_target_refused"),
                      ("https://[::1]/hook", "webhook_target_refused"),
                      ("http://93.184.215.14/hook", "invalid_webhook_url"),
                      ("https://user:pw@example.com/hook", "invalid_webhook_url")]:
        r = platform.http.post("/v1/webhooks", json={"url": url, "events": ["job.ready"]},
                               headers=platform.auth(sdk.api_key or ""))
        assert (r.status_code, r.json()["error"]["code"]) == (422, code), (url, r.text)
    assert sdk.webhooks.list() == []
    r = platform.http.post("/v1/webhooks", json={"url": receiver.url("ok"), "events": ["job.sent"]},
                           headers=platform.auth(sdk.api_key or ""))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    # A per-request webhook_url must be a registered endpoint: nothing is created otherwise.
    r = platform.http.post("/v1/synthesize", headers=platform.auth(sdk.api_key or ""),
                           json={"voice_id": JOE.voice_id, "text": "Never spoken.", "webhook_url": receiver.url("ok")})
    assert r.status_code == 422 and r.json()["error"]["code"] == "webhook_not_registered"


def test_job_ready_is_signed_and_verifies_with_the_sdk(platform: Client, receiver: Receiver) -> None:
    sdk, other = _sdk(platform), _sdk(platform)
    hook = sdk.webhooks.create(receiver.url("ok"), events=["job.ready"], description="e2e")
    assert hook.secret.startswith("whsec_") and [w.webhook_id for w in sdk.webhooks.list()] == [hook.webhook_id]
    with pytest.raises(NotFoundError):  # another account's endpoint does not exist for this one
        other.webhooks.get(hook.webhook_id)
    job_id = _speak(sdk, f"Webhooks tell you when it is ready {uuid.uuid4().hex[:6]}.")
    got = receiver.wait_for("ok")
    mine = [g for g in got if job_id.encode() in g["body"]]
    assert len(mine) == 1
    delivery = mine[0]
    event = webhooks.verify(delivery["body"], delivery["headers"]["timbre-signature"], hook.secret)
    assert event.type == "job.ready" and event.data["job_id"] == job_id and event.data["backend"] == "embedded"
    assert delivery["headers"]["timbre-event-id"] == event.id
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(delivery["body"].replace(b"ready", b"reedy"), delivery["headers"]["timbre-signature"],
                        hook.secret)
    [record] = _deliveries(sdk, hook.webhook_id, "delivered")
    assert record.event_id == event.id and record.attempts == 1
    assert record.attempt_log[0].status_code == 204


def test_rotation_signs_with_both_secrets_and_webhook_url_targets_one_job(platform: Client,
                                                                          receiver: Receiver) -> None:
    sdk = _sdk(platform)
    # Subscribed to nothing about jobs: only a request that names it sends it that job's outcome.
    hook = sdk.webhooks.create(receiver.url("per-request"), events=["voice.deleted"])
    _speak(sdk, f"Nobody is told about this one {uuid.uuid4().hex[:6]}.")
    rotated = sdk.webhooks.rotate(hook.webhook_id, grace_s=600)
    assert rotated.secret != hook.secret and rotated.previous_secret_expires_at is not None
    job_id = _speak(sdk, f"This one is announced {uuid.uuid4().hex[:6]}.", webhook_url=receiver.url("per-request"))
    [delivery] = receiver.wait_for("per-request")
    assert job_id.encode() in delivery["body"]
    header = delivery["headers"]["timbre-signature"]
    assert header.count("v1=") == 2
    for secret in (hook.secret, rotated.secret):
        assert webhooks.verify(delivery["body"], header, secret).data["job_id"] == job_id


def test_failing_receiver_is_retried_then_parked(platform: Client, receiver: Receiver) -> None:
    sdk = _sdk(platform)
    name = f"fail-{uuid.uuid4().hex[:6]}"
    hook = sdk.webhooks.create(receiver.url(name), events=["job.ready"])
    _speak(sdk, f"The receiver of this one is broken {uuid.uuid4().hex[:6]}.")
    [record] = _deliveries(sdk, hook.webhook_id, "parked")
    assert record.attempts == 3 and [a.status_code for a in record.attempt_log] == [500, 500, 500]
    assert record.attempt_log[0].response == "receiver is broken" and record.last_status == 500
    got = receiver.wait_for(name, 3)
    assert len(got) == 3
    assert [g["headers"]["timbre-delivery-attempt"] for g in got] == ["1", "2", "3"]
    assert len({g["headers"]["timbre-event-id"] for g in got}) == 1


def test_a_slow_endpoint_holds_up_only_itself(platform: Client, receiver: Receiver) -> None:
    slow_tenant, other_tenant = _sdk(platform), _sdk(platform)
    slow_tenant.webhooks.create(receiver.url("slow"), events=["job.ready"])
    other_tenant.webhooks.create(receiver.url("prompt"), events=["job.ready"])
    tag = uuid.uuid4().hex[:6]
    slow_jobs = [slow_tenant.speech.create(f"Slow number {n} {tag}.", voice=JOE.voice_id).job_id  # type: ignore
                 for n in range(4)]
    for job_id in slow_jobs:
        slow_tenant.jobs.wait(job_id)
    _speak(other_tenant, f"Prompt delivery {tag}.")
    [prompt] = receiver.wait_for("prompt")
    receiver.wait_for("slow", 4)
    # The other tenant's delivery did not queue behind the slow endpoint's four (one at a time, each answered
    # slowly), and the slow endpoint never had more than its one delivery in flight.
    assert prompt["slow_answered_before"] < 4
    assert receiver.slow_most_in_flight == 1


def test_account_purged_is_sent_then_the_endpoints_go(platform: Client, receiver: Receiver) -> None:
    sdk = _sdk(platform)
    hook = sdk.webhooks.create(receiver.url("purged"), events=["account.purged"])
    account_id = platform.sql("SELECT account_id::text FROM gateway.webhook_endpoints WHERE webhook_id = $1",
                              uuid.UUID(hook.webhook_id))[0][0]
    purge = sdk.account.delete()
    [delivery] = receiver.wait_for("purged")
    event = webhooks.verify(delivery["body"], delivery["headers"]["timbre-signature"], hook.secret)
    assert event.type == "account.purged" and event.data == {"account_id": account_id, "purge_id": purge.purge_id}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = platform.sql("SELECT (SELECT count(*) FROM gateway.webhook_endpoints WHERE account_id = $1) + "
                            "(SELECT count(*) FROM gateway.webhook_deliveries WHERE account_id = $1)",
                            uuid.UUID(account_id))[0][0]
        if left == 0:
            break
        time.sleep(0.2)
    assert left == 0


def test_voice_deleted_is_announced(platform: Client, receiver: Receiver, wavs) -> None:  # type: ignore[no-untyped-def]
    sdk = _sdk(platform)
    hook = sdk.webhooks.create(receiver.url("voices"), events=["voice.deleted"])
    voice = sdk.voices.create(wavs.valid_wav(8.0), name="short-lived")
    sdk.voices.delete(voice.voice_id)
    [delivery] = receiver.wait_for("voices")
    event = webhooks.verify(delivery["body"], delivery["headers"]["timbre-signature"], hook.secret)
    assert event.type == "voice.deleted" and event.data == {"voice_id": voice.voice_id}
    sdk.webhooks.delete(hook.webhook_id)
    assert sdk.webhooks.list() == []
    with pytest.raises(NotFoundError):
        sdk.webhooks.deliveries(hook.webhook_id)
