"""Dispatcher handlers with fakes: cache, joining jobs, the replay guard, retries, deadlines, purges."""
from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from timbre_common.contracts.accounts import AccountPurged, AccountPurgeRequested
from timbre_common.contracts.storage import AudioStored, GetRendition, ObjectsExpired, ObjectsReleased
from timbre_common.contracts.synthesis import (
    FetchJobAudio,
    GetJob,
    JobFailed,
    JobReady,
    LookupJob,
    PurgeVoiceJobs,
    SubmitSynthesis,
    SynthesisAccepted,
    SynthesisFailed,
    SynthesisRequested,
    VoiceSnapshot,
)
from timbre_common.contracts.voices import VoiceDeleted
from timbre_common.messaging import NotFound, RemoteError, RpcError, work_routing_key
from timbre_common.testing import FakeBus, envelope, load_module
from timbre_dispatcher import domain, handlers

fakes = load_module("timbre_dispatcher_unit_fakes", Path(__file__).with_name("fakes.py"))

ACCOUNT, OTHER = "acc-1", "acc-2"
VOICE = "0b6c1d8e-2f0a-4c1e-9a51-6f2d3b7a8c90"
BACKEND = "qwen3-0.6b"
ENV = envelope()


class World:
    """The dispatcher's dependencies as fakes, and the handlers bound to them as bootstrap binds them."""

    def __init__(self, max_attempts: int = 3) -> None:
        self.clock = fakes.Clock()
        self.bus = FakeBus()
        self.jobs = fakes.FakeJobRepository(self.clock)
        self.cache = fakes.FakeCacheIndex(self.clock)
        self.storage = fakes.FakeStorage(self.bus, self.clock)
        self.policy = handlers.JobPolicy(deadline_s=300.0, max_attempts=max_attempts, reference_url_ttl_s=600)
        self.storage.put(custom_voice().reference_key, b"RIFF-reference")

    def voice(self, voice_id: str) -> VoiceSnapshot:
        """A custom voice whose reference audio is in storage."""
        snapshot = custom_voice(voice_id)
        self.storage.put(snapshot.reference_key, b"RIFF-reference")
        return snapshot

    def deps(self, *names: str) -> dict[str, Any]:
        return {n: getattr(self, n) for n in names}

    async def submit(self, text: str = "Hello there.", *, account: str = ACCOUNT,
                     voice: VoiceSnapshot | None = None, backend: str = BACKEND, response_format: str = "wav") -> Any:
        voice = voice or custom_voice()
        cmd = SubmitSynthesis(account_id=account, voice=voice, text=text, lang="en", backend=backend,
                              response_format=response_format)
        return await handlers.submit(cmd, envelope=ENV, **self.deps("jobs", "cache", "bus", "policy"))

    async def stored(self, job_id: str, *, key: str | None = None, account: str = ACCOUNT) -> AudioStored:
        """Storage wrote the job's WAV and announced it."""
        key = key or f"generations/{account}/{job_id}.wav"
        event = AudioStored(job_id=job_id, account_id=account, key=key, size=44,
                            expires_at=self.clock() + timedelta(days=7), synthesis_ms=120, audio_seconds=1.5)
        self.storage.put(event.key, b"RIFF-generated", event.expires_at)
        await handlers.on_audio_stored(event, envelope=envelope(), **self.deps("jobs", "cache", "bus"))
        return event

    async def failed(self, job_id: str, *, retryable: bool, code: str = "worker_crashed",
                     attempt: int | None = None) -> None:
        event = SynthesisFailed(job_id=job_id, account_id=ACCOUNT, code=code, reason="boom",
                                retryable=retryable, attempt=attempt)
        await handlers.on_synthesis_failed(event, envelope=envelope(), **self.deps("jobs", "bus", "policy"))

    def orders(self) -> list[SynthesisRequested]:
        return self.bus.events(SynthesisRequested)  # type: ignore[return-value]

    def message_ids(self, cls: type) -> list[str | None]:
        return [mid for e, _, mid in self.bus.published if isinstance(e, cls)]


def custom_voice(voice_id: str = VOICE) -> VoiceSnapshot:
    return VoiceSnapshot(voice_id=voice_id, backend=BACKEND, lang="en", kind="custom",
                         reference_key=f"voices/custom/{ACCOUNT}/{voice_id}.wav", ref_text="Reference words.",
                         profile={BACKEND: {"x_vector": [0.1]}, "embedded": {"nearest": "joe"}})


def system_voice() -> VoiceSnapshot:
    return VoiceSnapshot(voice_id="sys-joe", backend="embedded", lang="en", kind="system",
                         reference_key="voices/system/sys-joe.wav", system_voice="joe")


@pytest.fixture
def world() -> World:
    return World()


# Cache keys ---------------------------------------------------------------------------------------------

def test_cache_key_is_sha256_of_voice_text_lang_backend_joined_by_nul() -> None:
    expected = hashlib.sha256(b"v1\x00hello\x00en\x00embedded").hexdigest()
    assert domain.cache_key("v1", "hello", "en", "embedded") == expected


def test_cache_key_separates_voices_and_field_boundaries() -> None:
    key = domain.cache_key("v1", "hello", "en", "embedded")
    assert key != domain.cache_key("v2", "hello", "en", "embedded")
    # Without a separator these two would hash the same bytes ("v1" + "hello" == "v" + "1hello").
    assert key != domain.cache_key("v", "1hello", "en", "embedded")
    assert domain.cache_key("v", "a", "en", "x") != domain.cache_key("v", "a\x00en", "x", "")


async def test_two_voices_with_the_same_text_get_two_jobs(world: World) -> None:
    first = await world.submit(voice=world.voice("11111111-1111-4111-8111-111111111111"))
    second = await world.submit(voice=world.voice("22222222-2222-4222-8222-222222222222"))
    assert first.job_id != second.job_id
    assert first.cache_key != second.cache_key
    assert len(world.orders()) == 2


# Submission ---------------------------------------------------------------------------------------------

async def test_a_miss_creates_a_pending_job_and_hands_out_the_work_order(world: World) -> None:
    accepted = await world.submit("Hello there.")
    assert isinstance(accepted, SynthesisAccepted) and not accepted.cache_hit and accepted.status == "pending"
    row = world.jobs.rows[accepted.job_id]
    assert row["status"] == "pending" and row["attempts"] == 1 and row["characters"] == len("Hello there.")
    [order] = world.orders()
    assert order.job_id == accepted.job_id and order.attempt == 1 and order.cache_key == accepted.cache_key
    assert order.reference_url == f"https://blobs.test/voices/custom/{ACCOUNT}/{VOICE}.wav?sig=x"
    assert order.ref_text == "Reference words."
    # Only the profile of the job's own backend travels.
    assert order.voice_profile == {"x_vector": [0.1]}
    assert world.bus.routing_keys[-1] == work_routing_key(BACKEND)
    assert world.message_ids(SynthesisRequested) == [f"{accepted.job_id}:1"]
    [presign] = [c for _, c, _ in world.bus.calls if not isinstance(c, GetRendition)]
    assert presign.expires_in == 600  # the policy's reference URL lifetime


async def test_a_system_voice_sends_its_bundled_name_and_no_reference(world: World) -> None:
    accepted = await world.submit(voice=system_voice(), backend="embedded")
    [order] = world.orders()
    assert order.reference_url is None and order.system_voice == "joe"
    assert world.bus.calls == []  # nothing to presign
    assert world.bus.routing_keys[-1] == work_routing_key("embedded")
    assert accepted.cache_key == domain.cache_key("sys-joe", "Hello there.", "en", "embedded")


async def test_a_cache_hit_returns_the_audio_and_creates_no_job(world: World) -> None:
    key = domain.cache_key(VOICE, "Hello there.", "en", BACKEND)
    expires = world.clock() + timedelta(days=7)
    await world.cache.put(account_id=ACCOUNT, cache_key=key, voice_id=VOICE, job_id="job-old",
                          audio_key="generations/a/old.wav", expires_at=expires, synthesis_ms=321)
    # Owned by the account: storage serves it only to a GetObject that names that account.
    world.storage.put("generations/a/old.wav", b"RIFF-cached", expires, owner=ACCOUNT)

    result = await world.submit("Hello there.")

    accepted, audio = result
    assert accepted.cache_hit and accepted.status == "ready" and accepted.job_id == "job-old"
    assert accepted.synthesis_ms == 321 and accepted.expires_at == expires
    assert audio == b"RIFF-cached"
    assert world.jobs.rows == {} and world.bus.published == []


async def test_the_cache_is_per_account(world: World) -> None:
    key = domain.cache_key(VOICE, "Hello there.", "en", BACKEND)
    await world.cache.put(account_id=OTHER, cache_key=key, voice_id=VOICE, job_id="job-other",
                          audio_key="generations/b/x.wav", expires_at=None, synthesis_ms=1)
    world.storage.put("generations/b/x.wav", b"RIFF")
    accepted = await world.submit("Hello there.", account=ACCOUNT)
    assert isinstance(accepted, SynthesisAccepted) and not accepted.cache_hit
    assert len(world.jobs.rows) == 1


async def test_a_cache_entry_whose_object_is_gone_is_dropped_and_a_job_created(world: World) -> None:
    key = domain.cache_key(VOICE, "Hello there.", "en", BACKEND)
    await world.cache.put(account_id=ACCOUNT, cache_key=key, voice_id=VOICE, job_id="job-old",
                          audio_key="generations/a/gone.wav", expires_at=None, synthesis_ms=5)

    accepted = await world.submit("Hello there.")

    assert isinstance(accepted, SynthesisAccepted) and not accepted.cache_hit and accepted.job_id != "job-old"
    assert (ACCOUNT, key) not in world.cache.entries
    assert accepted.job_id in world.jobs.rows and len(world.orders()) == 1


async def test_a_storage_error_other_than_not_found_is_not_swallowed(world: World) -> None:
    key = domain.cache_key(VOICE, "Hello there.", "en", BACKEND)
    await world.cache.put(account_id=ACCOUNT, cache_key=key, voice_id=VOICE, job_id="job-old",
                          audio_key="generations/a/x.wav", expires_at=None, synthesis_ms=5)

    async def broken(cmd: GetRendition, body: bytes | None) -> None:
        raise RemoteError("storage_unavailable", "disk on fire", status=503)

    world.bus.on(GetRendition, broken)
    with pytest.raises(RemoteError):
        await world.submit("Hello there.")
    assert (ACCOUNT, key) in world.cache.entries and world.jobs.rows == {}


async def test_a_voice_whose_reference_is_gone_fails_the_job_at_once(world: World) -> None:
    del world.storage.objects[custom_voice().reference_key]
    accepted = await world.submit("No reference.")
    assert accepted.status == "failed"
    row = world.jobs.rows[accepted.job_id]
    assert row["status"] == "failed" and row["error_code"] == "reference_missing"
    assert world.orders() == [] and [e.code for e in world.bus.events(JobFailed)] == ["reference_missing"]
    # The next identical request is not joined to the failed job (it would wait forever).
    again = await world.submit("No reference.")
    assert again.job_id != accepted.job_id


async def test_an_identical_pending_job_is_joined_not_duplicated(world: World) -> None:
    first = await world.submit("Same words.")
    second = await world.submit("Same words.")
    assert second.job_id == first.job_id and not second.cache_hit
    assert len(world.jobs.rows) == 1 and len(world.orders()) == 1
    # Another account asking the same is not joined to this account's job.
    third = await world.submit("Same words.", account=OTHER)
    assert third.job_id != first.job_id and len(world.orders()) == 2
    # The same words in another format are another job: the joined job would answer in the first format.
    mp3 = await world.submit("Same words.", response_format="mp3")
    assert mp3.job_id != first.job_id and len(world.orders()) == 3


async def test_a_finished_job_is_not_joined(world: World) -> None:
    first = await world.submit("Words.")
    await world.failed(first.job_id, retryable=False)
    again = await world.submit("Words.")
    assert again.job_id != first.job_id and len(world.orders()) == 2


# Results and the replay guard -----------------------------------------------------------------------------

async def test_audio_stored_marks_the_job_ready_indexes_it_and_emits_job_ready(world: World) -> None:
    accepted = await world.submit("Ready soon.")
    event = await world.stored(accepted.job_id)
    row = world.jobs.rows[accepted.job_id]
    assert row["status"] == "ready" and row["audio_key"] == event.key and row["synthesis_ms"] == 120
    entry = world.cache.entries[(ACCOUNT, accepted.cache_key)]
    assert entry["audio_key"] == event.key and entry["job_id"] == accepted.job_id
    [ready] = world.bus.events(JobReady)
    assert (ready.job_id, ready.characters, ready.backend) == (accepted.job_id, len("Ready soon."), BACKEND)
    assert world.message_ids(JobReady) == [f"job.ready:{accepted.job_id}"]
    # The next identical request is a cache hit.
    world.storage.put(event.key, b"RIFF-new", event.expires_at)
    hit, audio = await world.submit("Ready soon.")
    assert hit.cache_hit and audio == b"RIFF-new"


async def test_audio_stored_twice_readies_the_job_once(world: World) -> None:
    accepted = await world.submit("Twice.")
    await world.stored(accepted.job_id)
    completed_at = world.jobs.rows[accepted.job_id]["completed_at"]
    world.clock.advance(5)
    await world.stored(accepted.job_id)
    assert world.jobs.rows[accepted.job_id]["completed_at"] == completed_at
    # However often it is (re)announced, job.ready is one message to every consumer's dedupe.
    assert set(world.message_ids(JobReady)) == {f"job.ready:{accepted.job_id}"}
    assert world.bus.events(ObjectsReleased) == []


async def test_a_redelivered_audio_stored_finishes_what_a_crash_interrupted(world: World) -> None:
    """The job was marked ready but job.ready was never published: the redelivery must publish it."""
    accepted = await world.submit("Crash between.")
    real_publish = world.bus.publish

    async def broker_down(event: Any, **kwargs: Any) -> str:
        if isinstance(event, JobReady):
            raise ConnectionError("broker went away")
        return await real_publish(event, **kwargs)

    world.bus.publish = broker_down  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await world.stored(accepted.job_id)
    assert world.jobs.rows[accepted.job_id]["status"] == "ready"
    world.bus.publish = real_publish  # type: ignore[method-assign]

    await world.stored(accepted.job_id)  # the consumer's retry of the same message

    assert [e.job_id for e in world.bus.events(JobReady)] == [accepted.job_id]
    assert (ACCOUNT, accepted.cache_key) in world.cache.entries


async def test_audio_stored_after_the_job_failed_changes_nothing_and_releases_the_audio(world: World) -> None:
    accepted = await world.submit("Too late.")
    await world.failed(accepted.job_id, retryable=False, code="unsupported_text")
    published = len(world.bus.published)
    event = await world.stored(accepted.job_id)
    row = world.jobs.rows[accepted.job_id]
    assert row["status"] == "failed" and row["error_code"] == "unsupported_text" and row["audio_key"] is None
    assert world.cache.entries == {} and world.bus.events(JobReady) == []
    # The first terminal transition won; the late audio has no owner and goes.
    [released] = world.bus.published[published:]
    assert isinstance(released[0], ObjectsReleased) and released[0].keys == [event.key]


async def test_audio_stored_for_a_deleted_job_releases_the_object(world: World) -> None:
    accepted = await world.submit("Orphan.")
    await handlers.on_voice_deleted(VoiceDeleted(voice_id=VOICE, account_id=ACCOUNT), envelope=ENV,
                                    **world.deps("jobs", "cache", "bus"))
    assert world.jobs.rows == {}
    event = await world.stored(accepted.job_id)
    [released] = world.bus.events(ObjectsReleased)
    assert released.keys == [event.key] and released.account_id == ACCOUNT
    assert world.bus.events(JobReady) == [] and world.cache.entries == {}


# Failures, retries and deadlines --------------------------------------------------------------------------

async def test_a_failure_of_an_older_attempt_does_not_fail_the_newer_one(world: World) -> None:
    accepted = await world.submit("Twice handed out.")
    await world.failed(accepted.job_id, retryable=True, attempt=1)  # attempt 2 goes out
    assert world.jobs.rows[accepted.job_id]["attempts"] == 2
    await world.failed(accepted.job_id, retryable=False, code="late_news", attempt=1)
    row = world.jobs.rows[accepted.job_id]
    assert row["status"] == "pending" and row["attempts"] == 2
    await world.failed(accepted.job_id, retryable=False, code="real", attempt=2)
    assert world.jobs.rows[accepted.job_id]["error_code"] == "real"


async def test_a_retryable_failure_redispatches_with_the_next_attempt_until_the_maximum(world: World) -> None:
    accepted = await world.submit("Flaky.")
    job_id = accepted.job_id
    await world.failed(job_id, retryable=True)
    await world.failed(job_id, retryable=True)
    assert [o.attempt for o in world.orders()] == [1, 2, 3]
    assert world.message_ids(SynthesisRequested) == [f"{job_id}:1", f"{job_id}:2", f"{job_id}:3"]
    assert all(o.reference_url for o in world.orders())  # each attempt gets a fresh presigned URL
    assert world.jobs.rows[job_id]["status"] == "pending" and world.bus.events(JobFailed) == []

    await world.failed(job_id, retryable=True)  # the third attempt fails too: attempts are spent

    row = world.jobs.rows[job_id]
    assert row["status"] == "failed" and row["error_code"] == "worker_crashed"
    assert "after 3 attempts" in row["error"]
    assert len(world.orders()) == 3
    [failed] = world.bus.events(JobFailed)
    assert failed.job_id == job_id and failed.code == "worker_crashed"
    assert world.message_ids(JobFailed) == [f"job.failed:{job_id}"]


async def test_a_final_failure_fails_the_job_at_once(world: World) -> None:
    accepted = await world.submit("Bad input.")
    await world.failed(accepted.job_id, retryable=False, code="unsupported_language")
    row = world.jobs.rows[accepted.job_id]
    assert (row["status"], row["error_code"], row["error"]) == ("failed", "unsupported_language", "boom")
    assert len(world.orders()) == 1 and len(world.bus.events(JobFailed)) == 1


async def test_a_failure_of_a_finished_or_unknown_job_is_ignored(world: World) -> None:
    accepted = await world.submit("Done.")
    await world.stored(accepted.job_id)
    published = len(world.bus.published)
    await world.failed(accepted.job_id, retryable=True)
    await world.failed(accepted.job_id, retryable=False)
    await world.failed(str(uuid.uuid4()), retryable=True)
    assert world.jobs.rows[accepted.job_id]["status"] == "ready"
    assert len(world.bus.published) == published


async def test_the_deadline_sweep_resends_overdue_jobs_then_fails_them_when_attempts_are_spent(
        world: World) -> None:
    late = (await world.submit("Late.")).job_id
    world.clock.advance(200)
    fresh = (await world.submit("Fresh.")).job_id

    world.clock.advance(150)  # 350 s after the first, 150 s after the second
    assert await handlers.sweep_overdue(**world.deps("jobs", "bus", "policy")) == 1
    assert [(o.job_id, o.attempt) for o in world.orders()] == [(late, 1), (fresh, 1), (late, 2)]
    assert world.jobs.rows[fresh]["attempts"] == 1

    # Nothing is overdue right after a sweep: the re-sent job has a fresh deadline.
    assert await handlers.sweep_overdue(**world.deps("jobs", "bus", "policy")) == 0

    for _ in range(2):
        world.clock.advance(301)
        await handlers.sweep_overdue(**world.deps("jobs", "bus", "policy"))
    row = world.jobs.rows[late]
    assert row["status"] == "failed" and row["error_code"] == "deadline_exceeded"
    assert "no result within 300s" in row["error"] and "after 3 attempts" in row["error"]
    assert [o.attempt for o in world.orders() if o.job_id == late] == [1, 2, 3]
    # The second job passed its own deadline in between and was re-sent twice; it has not run out yet.
    assert [e.job_id for e in world.bus.events(JobFailed)] == [late]
    assert world.jobs.rows[fresh]["status"] == "pending" and world.jobs.rows[fresh]["attempts"] == 3


async def test_the_sweep_fails_a_job_whose_reference_vanished_instead_of_resending_it(world: World) -> None:
    stuck = (await world.submit("Reference deleted later.")).job_id
    healthy = (await world.submit("Fine.", voice=system_voice(), backend="embedded")).job_id
    del world.storage.objects[custom_voice().reference_key]
    world.clock.advance(301)

    assert await handlers.sweep_overdue(**world.deps("jobs", "bus", "policy")) == 2

    assert world.jobs.rows[stuck]["status"] == "failed"
    assert world.jobs.rows[stuck]["error_code"] == "reference_missing"
    assert [(o.job_id, o.attempt) for o in world.orders()] == [(stuck, 1), (healthy, 1), (healthy, 2)]


async def test_a_late_result_after_a_deadline_resend_still_completes_the_job(world: World) -> None:
    accepted = await world.submit("Slow worker.")
    world.clock.advance(301)
    await handlers.sweep_overdue(**world.deps("jobs", "bus", "policy"))
    await world.stored(accepted.job_id)  # attempt 1 finally answers
    assert world.jobs.rows[accepted.job_id]["status"] == "ready"
    assert len(world.bus.events(JobReady)) == 1


# Expiry and self-healing ----------------------------------------------------------------------------------

async def test_expired_objects_drop_cache_entries_and_fail_their_jobs(world: World) -> None:
    kept = await world.submit("Kept.")
    gone = await world.submit("Gone.")
    kept_event = await world.stored(kept.job_id)
    gone_event = await world.stored(gone.job_id)

    await handlers.on_objects_expired(ObjectsExpired(keys=[gone_event.key, "generations/x/unrelated.wav"]),
                                      envelope=ENV, **world.deps("jobs", "cache", "bus"))

    assert (ACCOUNT, gone.cache_key) not in world.cache.entries
    assert (ACCOUNT, kept.cache_key) in world.cache.entries
    row = world.jobs.rows[gone.job_id]
    assert row["status"] == "failed" and row["error_code"] == "audio_expired"
    assert world.jobs.rows[kept.job_id]["status"] == "ready"
    assert world.jobs.rows[kept.job_id]["audio_key"] == kept_event.key
    assert [(e.job_id, e.code) for e in world.bus.events(JobFailed)] == [(gone.job_id, "audio_expired")]


async def test_fetching_audio_of_a_ready_job_whose_object_vanished_self_heals_to_failed(world: World) -> None:
    accepted = await world.submit("Vanishing.")
    event = await world.stored(accepted.job_id)
    del world.storage.objects[event.key]
    with pytest.raises(RpcError) as caught:
        await handlers.fetch_audio(FetchJobAudio(account_id=ACCOUNT, job_id=accepted.job_id), envelope=ENV,
                                   **world.deps("jobs", "cache", "bus"))
    assert caught.value.code == "audio_missing" and caught.value.status == 500
    row = world.jobs.rows[accepted.job_id]
    assert row["status"] == "failed" and row["error_code"] == "audio_missing"
    assert (ACCOUNT, accepted.cache_key) not in world.cache.entries
    assert [e.code for e in world.bus.events(JobFailed)] == ["audio_missing"]
    assert world.jobs.rows[accepted.job_id]["audio_key"] == event.key


async def test_audio_past_its_retention_but_not_yet_swept_heals_to_expired_not_missing(world: World) -> None:
    accepted = await world.submit("Old news.")
    event = await world.stored(accepted.job_id)
    world.storage.put(event.key, b"RIFF-old", expires_at=world.clock() - timedelta(seconds=1))
    with pytest.raises(RpcError) as caught:
        await handlers.fetch_audio(FetchJobAudio(account_id=ACCOUNT, job_id=accepted.job_id), envelope=ENV,
                                   **world.deps("jobs", "cache", "bus"))
    assert (caught.value.code, caught.value.status) == ("audio_expired", 410)
    row = world.jobs.rows[accepted.job_id]
    assert row["status"] == "failed" and row["error_code"] == "audio_expired"
    assert [e.code for e in world.bus.events(JobFailed)] == ["audio_expired"]
    # After the heal (or the sweep), the answer stays the same: gone, not "not ready".
    with pytest.raises(RpcError) as again:
        await handlers.fetch_audio(FetchJobAudio(account_id=ACCOUNT, job_id=accepted.job_id), envelope=ENV,
                                   **world.deps("jobs", "cache", "bus"))
    assert (again.value.code, again.value.status) == ("audio_expired", 410)


async def test_fetching_audio_returns_the_bytes_of_a_ready_job(world: World) -> None:
    accepted = await world.submit("Here.")
    event = await world.stored(accepted.job_id)
    world.storage.put(event.key, b"RIFF-here")
    view, audio = await handlers.fetch_audio(FetchJobAudio(account_id=ACCOUNT, job_id=accepted.job_id),
                                             envelope=ENV, **world.deps("jobs", "cache", "bus"))
    assert audio == b"RIFF-here" and view.status == "ready" and view.audio_url is None


async def test_fetching_audio_of_a_pending_job_is_not_ready(world: World) -> None:
    accepted = await world.submit("Wait.")
    with pytest.raises(NotFound) as caught:
        await handlers.fetch_audio(FetchJobAudio(account_id=ACCOUNT, job_id=accepted.job_id), envelope=ENV,
                                   **world.deps("jobs", "cache", "bus"))
    assert caught.value.code == "job_not_ready"


# Reads --------------------------------------------------------------------------------------------------

async def test_get_job_presigns_the_audio_of_a_ready_job(world: World) -> None:
    accepted = await world.submit("Look.")
    pending = await handlers.get_job(GetJob(account_id=ACCOUNT, job_id=accepted.job_id), envelope=ENV,
                                     **world.deps("jobs", "bus"))
    assert pending.status == "pending" and pending.audio_url is None
    event = await world.stored(accepted.job_id)
    ready = await handlers.get_job(GetJob(account_id=ACCOUNT, job_id=accepted.job_id), envelope=ENV,
                                   **world.deps("jobs", "bus"))
    assert ready.status == "ready" and ready.audio_url == f"https://blobs.test/{event.key}?sig=x"
    assert ready.expires_at == event.expires_at and ready.audio_seconds == 1.5


@pytest.mark.parametrize("job_id", ["not-a-uuid", "", str(uuid.uuid4())])
async def test_get_job_of_a_malformed_or_unknown_id_is_not_found(world: World, job_id: str) -> None:
    with pytest.raises(NotFound) as caught:
        await handlers.get_job(GetJob(account_id=ACCOUNT, job_id=job_id), envelope=ENV,
                               **world.deps("jobs", "bus"))
    assert caught.value.code == "job_not_found"


async def test_another_accounts_job_is_not_found_but_lookup_sees_its_owner(world: World) -> None:
    accepted = await world.submit("Mine.")
    with pytest.raises(NotFound):
        await handlers.get_job(GetJob(account_id=OTHER, job_id=accepted.job_id), envelope=ENV,
                               **world.deps("jobs", "bus"))
    owner = await handlers.lookup_job(LookupJob(job_id=accepted.job_id), envelope=ENV, jobs=world.jobs)
    assert owner.account_id == ACCOUNT and owner.status == "pending" and owner.backend == BACKEND


# Purges -------------------------------------------------------------------------------------------------

async def test_purging_a_voice_deletes_its_jobs_and_cache_and_releases_their_audio(world: World) -> None:
    other_voice = world.voice("33333333-3333-4333-8333-333333333333")
    done = await world.submit("One.")
    pending = await world.submit("Two.")
    kept = await world.submit("Three.", voice=other_voice)
    done_event = await world.stored(done.job_id)
    kept_event = await world.stored(kept.job_id)

    await handlers.purge_voice(PurgeVoiceJobs(account_id=ACCOUNT, voice_id=VOICE), envelope=ENV,
                               **world.deps("jobs", "cache", "bus"))

    assert set(world.jobs.rows) == {kept.job_id}
    assert list(world.cache.entries) == [(ACCOUNT, kept.cache_key)]
    [released] = world.bus.events(ObjectsReleased)
    assert released.keys == [done_event.key] and released.account_id == ACCOUNT
    assert kept_event.key not in released.keys and pending.job_id not in world.jobs.rows


async def test_purging_a_voice_with_no_audio_releases_nothing(world: World) -> None:
    await world.submit("Pending only.")
    await handlers.on_voice_deleted(VoiceDeleted(voice_id=VOICE, account_id=ACCOUNT), envelope=ENV,
                                    **world.deps("jobs", "cache", "bus"))
    assert world.jobs.rows == {} and world.bus.events(ObjectsReleased) == []


async def test_an_account_purge_removes_its_jobs_and_cache_and_confirms(world: World) -> None:
    mine = await world.submit("Mine.")
    await world.stored(mine.job_id)
    await world.submit("Also mine.")
    theirs = await world.submit("Theirs.", account=OTHER)

    await handlers.on_account_purge(AccountPurgeRequested(account_id=ACCOUNT, purge_id="p-1"), envelope=ENV,
                                    **world.deps("jobs", "cache", "bus"))

    assert set(world.jobs.rows) == {theirs.job_id}
    assert all(account != ACCOUNT for account, _ in world.cache.entries)
    [purged] = world.bus.events(AccountPurged)
    assert (purged.account_id, purged.purge_id, purged.service) == (ACCOUNT, "p-1", "dispatcher")
    assert purged.removed == 2
