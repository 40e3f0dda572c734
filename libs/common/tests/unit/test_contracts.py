"""The wire contracts: the reviewed schema snapshot, the additive rule, upcasting old versions, closed vocabularies."""
from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import ClassVar

import pytest

from timbre_common.contracts import REGISTRY, UPCASTERS, Envelope, Event, resolve, snapshot, upcaster
from timbre_common.contracts.base import JOB_STATUSES, UPLOAD_PURPOSE_NAMES, VOICE_KINDS
from timbre_common.contracts.synthesis import JobView
from timbre_common.messaging.codec import UndecodableMessage, decode, encode


def test_the_snapshot_is_the_code() -> None:
    """Any change to a message shows in the snapshot's diff: `python -m timbre_common.contracts.snapshot --write`
    records it, and refuses a breaking one."""
    recorded = snapshot.load()
    now = snapshot.current()
    assert snapshot.breaking_changes(recorded, now) == []
    assert sorted(now) == sorted(recorded), "messages added or removed: refresh the snapshot"
    stale = [key for key in now if now[key] != recorded[key]]
    assert stale == [], f"schemas changed: refresh the snapshot ({stale})"


def _with(schemas: dict, key: str, change) -> dict:  # type: ignore[no-untyped-def]
    out = copy.deepcopy(schemas)
    change(out[key]["schema"])
    return out


def test_only_additive_changes_pass() -> None:
    now = snapshot.current()
    key = "dispatch.job v1"
    assert snapshot.breaking_changes(now, now) == []

    def optional_field(schema: dict) -> None:
        schema["properties"]["shiny"] = {"type": "string"}

    assert snapshot.breaking_changes(now, _with(now, key, optional_field)) == []

    def required_field(schema: dict) -> None:
        schema["properties"]["shiny"] = {"type": "string"}
        schema["required"].append("shiny")

    def removed_field(schema: dict) -> None:
        del schema["properties"]["backend"]

    def retyped_field(schema: dict) -> None:
        schema["properties"]["backend"] = {"type": "integer"}

    def widened_vocabulary(schema: dict) -> None:
        schema["properties"]["status"]["enum"].append("cancelled")

    for change, words in ((required_field, "shiny is required now"), (removed_field, "backend removed"),
                          (retyped_field, "backend changed"), (widened_vocabulary, "status changed")):
        [problem] = snapshot.breaking_changes(now, _with(now, key, change))
        assert words in problem, problem
    without = {k: v for k, v in now.items() if k != key}
    assert snapshot.breaking_changes(now, without) == [f"{key} removed without an upcaster to its next version"]


@pytest.fixture
def greetings():  # type: ignore[no-untyped-def]
    """A breaking change made right: v2 renames a field and v1 payloads are upcast; v1's class is gone from the
    code by the time they are read. Both are registered for this test only."""

    class OldGreeting(Event):
        TYPE: ClassVar[str] = "test.greeting"
        VERSION: ClassVar[int] = 1
        name: str

    del REGISTRY[("test.greeting", 1)]

    class Greeting(Event):
        TYPE: ClassVar[str] = "test.greeting"
        VERSION: ClassVar[int] = 2
        who: str
        polite: bool

    @upcaster("test.greeting", 1)
    def v1_to_v2(payload: dict) -> dict:
        return {"who": payload.pop("name"), "polite": True, **payload}

    try:
        yield OldGreeting, Greeting
    finally:
        REGISTRY.pop(("test.greeting", 2), None)
        UPCASTERS.pop(("test.greeting", 1), None)


def test_an_old_version_is_read_through_its_upcaster(greetings) -> None:  # type: ignore[no-untyped-def]
    old_greeting, greeting_v2 = greetings
    old = old_greeting(name="Ada")
    # As a v1 producer wrote it (still in a queue, an outbox or a retry tier when the code moved on).
    wire = encode(old, Envelope(type="test.greeting", version=1, account_id="acct"))
    incoming = SimpleNamespace(headers=wire.headers, type=wire.type, body=wire.body, message_id=wire.message_id,
                               correlation_id=None)
    msg, envelope, body = decode(incoming)  # type: ignore[arg-type]
    assert isinstance(msg, greeting_v2) and (msg.who, msg.polite) == ("Ada", True)
    assert envelope.version == 2 and envelope.account_id == "acct" and body is None
    assert resolve("test.greeting", 1, {"name": "Bo"}) == (greeting_v2, {"who": "Bo", "polite": True})
    # The additive rule accepts the old version's disappearance: it has an upcaster.
    before = {"test.greeting v1": {"kind": "Event", "binary": False, "schema": old_greeting.model_json_schema()}}
    assert snapshot.breaking_changes(before, {}) == []
    # A version nobody can read is still refused.
    unknown = SimpleNamespace(headers={"x-version": 7}, type="test.greeting", body=b"{}", message_id="m",
                              correlation_id=None)
    with pytest.raises(UndecodableMessage):
        decode(unknown)  # type: ignore[arg-type]


def test_vocabularies_are_the_owners() -> None:
    from timbre_dispatcher import domain as dispatcher
    from timbre_storage.domain import UploadPurpose

    assert set(JOB_STATUSES) == {dispatcher.PENDING, dispatcher.READY, dispatcher.FAILED}
    assert set(UPLOAD_PURPOSE_NAMES) == {p.value for p in UploadPurpose}
    assert set(VOICE_KINDS) == {"system", "custom"}
    with pytest.raises(ValueError):
        JobView(job_id="j", voice_id="v", status="cancelled", backend="embedded", lang="en",
                created_at="2026-01-01T00:00:00Z")


def test_a_handler_table_must_match_its_queue() -> None:
    from timbre_common.contracts.accounts import AccountPurgeRequested
    from timbre_common.contracts.synthesis import SynthesisRequested
    from timbre_common.contracts.voices import VoiceDeleted, VoiceProfiled
    from timbre_common.messaging.topology import QUEUES, handler_table_problems, local_work_queue

    voices = QUEUES["voices.events"]
    assert handler_table_problems(voices, [VoiceProfiled, AccountPurgeRequested]) == []
    # A bound message nobody handles, and a handler nothing feeds: both named.
    assert handler_table_problems(voices, [VoiceProfiled, VoiceDeleted]) == [
        f"voices.events: messages bound by {AccountPurgeRequested.routing_key()!r} have no handler",
        "voices.events: the handler of voice.deleted v1 has no binding"]
    # Work orders are bound per backend, under the message's own key.
    assert handler_table_problems(local_work_queue("embedded"), [SynthesisRequested]) == []
