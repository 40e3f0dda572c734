"""Gateway event handlers and the backend registry with fakes: purges, provisioning, heartbeats."""
from __future__ import annotations

import uuid
from typing import Any

import pytest

from timbre_common.catalogue import BACKEND_PREFERENCE
from timbre_common.contracts.accounts import PURGING_SERVICES, AccountPurged, AccountPurgeRequested, ApiKeysChanged
from timbre_common.contracts.billing import AccountKeysRestored, AccountKeysRevoked, AccountProvisioningRequested
from timbre_common.contracts.synthesis import WorkerHeartbeat
from timbre_common.testing import FakeBus, envelope
from timbre_gateway import handlers
from timbre_gateway.adapters.backends import BackendRegistry
from timbre_gateway.domain import hash_api_key, mint_api_key

ENV = envelope()


class FakeAccountRepository:
    """Implements the AccountRepository methods the event handlers use, on dicts."""

    def __init__(self) -> None:
        self.accounts: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, dict[str, Any]] = {}
        self.purges: dict[str, dict[str, Any]] = {}
        self.checkout_keys: dict[str, dict[str, Any]] = {}

    async def create_key(self, *, label: str | None, account_id: str | None = None, email: str | None = None,
                         rate_per_minute: int | None = None,
                         max_concurrent: int | None = None) -> tuple[str, dict[str, Any]]:
        key = mint_api_key()
        account_id = account_id or str(uuid.uuid4())
        self.accounts.setdefault(account_id, {"label": label, "email": email, "status": "active"})
        row = {"key_id": str(uuid.uuid4()), "account_id": account_id, "key_hash": hash_api_key(key),
               "label": label, "revoked_at": None}
        self.keys[row["key_id"]] = row
        return key, row

    async def account_exists(self, account_id: str) -> bool:
        return account_id in self.accounts

    async def restore_account(self, account_id: str) -> None:
        if account_id in self.accounts:
            self.accounts[account_id]["status"] = "active"

    async def revoke_account_keys(self, account_id: str) -> int:
        if account_id not in self.accounts:
            return 0
        self.accounts[account_id]["status"] = "suspended"
        return 1

    async def delete_account(self, account_id: str) -> int:
        gone = [k for k, row in self.keys.items() if row["account_id"] == account_id]
        for key_id in gone:
            del self.keys[key_id]
        self.checkout_keys = {t: c for t, c in self.checkout_keys.items() if c["account_id"] != account_id}
        self.accounts.pop(account_id, None)
        return len(gone)

    async def start_purge(self, account_id: str) -> str:
        purge_id = str(uuid.uuid4())
        self.purges[purge_id] = {"account_id": account_id, "confirmed": {}, "completed": False}
        return purge_id

    async def unfinished_purges(self, *, older_than_s: float, within_s: float) -> list[dict[str, Any]]:
        # The fake has no clock: every unfinished purge counts as old enough.
        return [{"purge_id": pid, "account_id": p["account_id"], "confirmed": dict(p["confirmed"])}
                for pid, p in self.purges.items() if not p["completed"]]

    async def confirm_purge(self, purge_id: str, service: str, removed: int,
                            required: tuple[str, ...]) -> None:
        purge = self.purges.get(purge_id)
        if purge is None:
            return
        purge["confirmed"][service] = removed
        purge["completed"] = purge["completed"] or all(s in purge["confirmed"] for s in required)

    async def store_checkout_key(self, token: str, account_id: str, api_key: str) -> None:
        self.checkout_keys.setdefault(token, {"account_id": account_id, "api_key": api_key})

    async def checkout_key_stored(self, token: str) -> bool:
        return token in self.checkout_keys

    def account_keys(self, account_id: str) -> list[dict[str, Any]]:
        return [row for row in self.keys.values() if row["account_id"] == account_id]


@pytest.fixture
def accounts() -> FakeAccountRepository:
    return FakeAccountRepository()


@pytest.fixture
def bus() -> FakeBus:
    return FakeBus()


def _provision(account_id: str, token: str | None = "tok-1") -> AccountProvisioningRequested:
    return AccountProvisioningRequested(account_id=account_id, customer_id="cus_1", email="buyer@example.com",
                                        checkout_token=token)


# Purges -------------------------------------------------------------------------------------------------

async def test_a_purge_request_deletes_the_accounts_keys_and_confirms(accounts: FakeAccountRepository,
                                                                      bus: FakeBus) -> None:
    _, first = await accounts.create_key(label="a")
    await accounts.create_key(label="b", account_id=first["account_id"])
    _, other = await accounts.create_key(label="other")

    await handlers.on_purge_requested(AccountPurgeRequested(account_id=first["account_id"], purge_id="p-1"),
                                      envelope=ENV, accounts=accounts, bus=bus)

    assert accounts.account_keys(first["account_id"]) == [] and first["account_id"] not in accounts.accounts
    assert accounts.account_keys(other["account_id"]) != []
    [purged] = bus.events(AccountPurged)
    assert (purged.account_id, purged.purge_id, purged.service) == (first["account_id"], "p-1", "gateway")
    assert purged.removed == 2


async def test_a_purge_completes_when_every_service_has_confirmed(accounts: FakeAccountRepository) -> None:
    purge_id = await accounts.start_purge("acc-1")
    for service in PURGING_SERVICES[:-1]:
        confirmation = AccountPurged(account_id="acc-1", purge_id=purge_id, service=service, removed=1)
        await handlers.on_purged(confirmation, envelope=ENV, accounts=accounts)
    assert not accounts.purges[purge_id]["completed"]
    # A repeated confirmation from a service that already answered completes nothing.
    await handlers.on_purged(AccountPurged(account_id="acc-1", purge_id=purge_id, service=PURGING_SERVICES[0],
                                           removed=1), envelope=ENV, accounts=accounts)
    assert not accounts.purges[purge_id]["completed"]
    last = AccountPurged(account_id="acc-1", purge_id=purge_id, service=PURGING_SERVICES[-1], removed=3)
    await handlers.on_purged(last, envelope=ENV, accounts=accounts)
    assert accounts.purges[purge_id]["completed"]
    assert accounts.purges[purge_id]["confirmed"][PURGING_SERVICES[-1]] == 3


# Provisioning and suspension ----------------------------------------------------------------------------

async def test_a_checkout_provisions_the_account_with_one_key_kept_for_the_success_page(
        accounts: FakeAccountRepository) -> None:
    account_id = str(uuid.uuid4())
    await handlers.on_provisioning_requested(_provision(account_id), envelope=ENV, accounts=accounts)
    [key] = accounts.account_keys(account_id)
    assert accounts.accounts[account_id]["email"] == "buyer@example.com"
    stored = accounts.checkout_keys["tok-1"]
    assert stored["account_id"] == account_id and hash_api_key(stored["api_key"]) == key["key_hash"]


async def test_a_redelivered_provisioning_mints_no_second_key(accounts: FakeAccountRepository) -> None:
    account_id = str(uuid.uuid4())
    for _ in range(2):
        await handlers.on_provisioning_requested(_provision(account_id), envelope=ENV, accounts=accounts)
    assert len(accounts.account_keys(account_id)) == 1 and list(accounts.checkout_keys) == ["tok-1"]


async def test_a_crash_between_minting_and_storing_the_key_is_healed_by_the_redelivery(
        accounts: FakeAccountRepository) -> None:
    """Without it the buyer has paid, the account exists, and the success page never shows a key."""
    account_id = str(uuid.uuid4())
    real_store = accounts.store_checkout_key

    async def crash(token: str, account: str, api_key: str) -> None:
        raise ConnectionError("database went away")

    accounts.store_checkout_key = crash  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await handlers.on_provisioning_requested(_provision(account_id), envelope=ENV, accounts=accounts)
    accounts.store_checkout_key = real_store  # type: ignore[method-assign]

    await handlers.on_provisioning_requested(_provision(account_id), envelope=ENV, accounts=accounts)

    stored = accounts.checkout_keys["tok-1"]
    assert hash_api_key(stored["api_key"]) in {k["key_hash"] for k in accounts.account_keys(account_id)}


async def test_provisioning_a_suspended_account_reactivates_it(accounts: FakeAccountRepository) -> None:
    account_id = str(uuid.uuid4())
    await handlers.on_provisioning_requested(_provision(account_id), envelope=ENV, accounts=accounts)
    await handlers.on_keys_revoked(AccountKeysRevoked(account_id=account_id, reason="payment_failed"),
                                   envelope=ENV, accounts=accounts)
    assert accounts.accounts[account_id]["status"] == "suspended"
    await handlers.on_provisioning_requested(_provision(account_id), envelope=ENV, accounts=accounts)
    assert accounts.accounts[account_id]["status"] == "active"
    assert len(accounts.account_keys(account_id)) == 1


async def test_a_returning_customers_new_checkout_gets_its_own_key(accounts: FakeAccountRepository) -> None:
    account_id = str(uuid.uuid4())
    await handlers.on_provisioning_requested(_provision(account_id, "tok-1"), envelope=ENV, accounts=accounts)
    await handlers.on_provisioning_requested(_provision(account_id, "tok-2"), envelope=ENV, accounts=accounts)
    assert len(accounts.account_keys(account_id)) == 2
    assert accounts.checkout_keys["tok-1"]["api_key"] != accounts.checkout_keys["tok-2"]["api_key"]


async def test_a_checkout_without_a_token_still_provisions(accounts: FakeAccountRepository) -> None:
    account_id = str(uuid.uuid4())
    await handlers.on_provisioning_requested(_provision(account_id, token=None), envelope=ENV,
                                             accounts=accounts)
    assert len(accounts.account_keys(account_id)) == 1 and accounts.checkout_keys == {}


async def test_revoked_then_restored_keys_suspend_and_reactivate(accounts: FakeAccountRepository) -> None:
    _, row = await accounts.create_key(label="k")
    account_id = row["account_id"]
    await handlers.on_keys_revoked(AccountKeysRevoked(account_id=account_id, reason="subscription_canceled"),
                                   envelope=ENV, accounts=accounts)
    assert accounts.accounts[account_id]["status"] == "suspended"
    await handlers.on_keys_restored(AccountKeysRestored(account_id=account_id), envelope=ENV,
                                    accounts=accounts)
    assert accounts.accounts[account_id]["status"] == "active"


# Backend registry ---------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _beat(worker: str, *backends: str, interval: float = 10.0) -> WorkerHeartbeat:
    return WorkerHeartbeat(worker_id=worker, backends=list(backends), interval_s=interval)


async def test_available_backends_follow_the_preference_order_whatever_the_beat_order() -> None:
    clock = Clock()
    registry = BackendRegistry(grace=3.0, clock=clock)
    await registry.on_heartbeat(_beat("cpu", "embedded"), envelope=ENV)
    await registry.on_heartbeat(_beat("gpu", "qwen3-0.6b", "qwen3-1.7b"), envelope=ENV)
    advertised = {"embedded", "qwen3-0.6b", "qwen3-1.7b"}
    assert registry.available() == [b for b in BACKEND_PREFERENCE if b in advertised]
    assert registry.default_backend("embedded") == BACKEND_PREFERENCE[0]


async def test_a_worker_that_stops_beating_drops_out_after_its_grace() -> None:
    clock = Clock()
    registry = BackendRegistry(grace=3.0, clock=clock)
    await registry.on_heartbeat(_beat("cpu", "embedded"), envelope=ENV)
    await registry.on_heartbeat(_beat("gpu", "qwen3-0.6b", interval=5.0), envelope=ENV)
    clock.now += 15.0  # exactly 3 intervals of the gpu worker: still trusted
    assert registry.available() == ["qwen3-0.6b", "embedded"]
    clock.now += 0.5
    assert registry.available() == ["embedded"]
    assert registry.known_unavailable("qwen3-0.6b") and not registry.known_unavailable("embedded")
    clock.now += 30.0
    assert registry.available() == [] and registry.default_backend("embedded") == "embedded"
    # A fresh beat brings it back at once.
    await registry.on_heartbeat(_beat("gpu", "qwen3-0.6b", interval=5.0), envelope=ENV)
    assert registry.available() == ["qwen3-0.6b"]


async def test_a_worker_that_changes_its_backends_is_believed_from_its_latest_beat() -> None:
    clock = Clock()
    registry = BackendRegistry(clock=clock)
    await registry.on_heartbeat(_beat("w", "embedded", "qwen3-0.6b"), envelope=ENV)
    await registry.on_heartbeat(_beat("w", "embedded"), envelope=ENV)
    assert registry.available() == ["embedded"]


async def test_absence_proves_nothing_until_the_warmup_has_passed_or_a_worker_has_beaten() -> None:
    clock = Clock()
    registry = BackendRegistry(clock=clock, warmup_s=12.0)
    assert not registry.known_unavailable("qwen3-1.7b")  # just started: workers may not have beaten yet
    clock.now += 12.5
    assert registry.known_unavailable("qwen3-1.7b")

    early = BackendRegistry(clock=clock, warmup_s=12.0)
    await early.on_heartbeat(_beat("cpu", "embedded"), envelope=ENV)
    assert early.known_unavailable("qwen3-1.7b") and not early.known_unavailable("embedded")


async def test_unfinished_purges_are_asked_for_again_until_every_service_confirms() -> None:
    accounts, bus = FakeAccountRepository(), FakeBus()
    done = await accounts.start_purge("acct-done")
    for service in PURGING_SERVICES:
        await accounts.confirm_purge(done, service, 0, PURGING_SERVICES)
    stuck = await accounts.start_purge("acct-stuck")
    await accounts.confirm_purge(stuck, "gateway", 1, PURGING_SERVICES)
    assert await handlers.resend_unfinished_purges(accounts=accounts, bus=bus) == 1
    [again] = bus.events(AccountPurgeRequested)
    assert (again.account_id, again.purge_id) == ("acct-stuck", stuck)
    for service in PURGING_SERVICES:
        await accounts.confirm_purge(stuck, service, 0, PURGING_SERVICES)
    assert await handlers.resend_unfinished_purges(accounts=accounts, bus=bus) == 0


async def test_suspending_and_restoring_an_account_announce_its_keys_changed(accounts: FakeAccountRepository,
                                                                             bus: FakeBus) -> None:
    account_id = str(uuid.uuid4())
    await handlers.on_provisioning_requested(_provision(account_id), envelope=ENV, accounts=accounts, bus=bus)
    assert bus.events(ApiKeysChanged) == []  # a new account: no instance holds its keys yet
    await handlers.on_keys_revoked(AccountKeysRevoked(account_id=account_id, reason="payment_failed"),
                                   envelope=ENV, accounts=accounts, bus=bus)
    await handlers.on_keys_restored(AccountKeysRestored(account_id=account_id), envelope=ENV, accounts=accounts,
                                    bus=bus)
    await handlers.on_provisioning_requested(_provision(account_id), envelope=ENV, accounts=accounts, bus=bus)
    assert [e.account_id for e in bus.events(ApiKeysChanged)] == [account_id] * 3
    assert accounts.accounts[account_id]["status"] == "active"
