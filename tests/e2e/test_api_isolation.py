"""Another account's voice, job, audio or upload is 404 on every route, never 403 and never its data."""
from __future__ import annotations

import io
import uuid

import pytest

pytestmark = pytest.mark.e2e

# Every route of the public API (billing's own routes aside) and the test below that covers it.
COVERED = {
    ("GET", "/v1/health"): "public", ("GET", "/v1/ready"): "public",
    ("POST", "/v1/keys"): "admin", ("GET", "/v1/keys"): "admin", ("PATCH", "/v1/keys/{key_id}"): "admin",
    ("DELETE", "/v1/keys/{key_id}"): "admin", ("DELETE", "/v1/admin/accounts/{account_id}"): "admin",
    ("GET", "/v1/admin/purges/{purge_id}"): "admin",
    ("POST", "/v1/voices"): "foreign", ("GET", "/v1/voices"): "foreign", ("GET", "/v1/voices/{voice_id}"): "foreign",
    ("DELETE", "/v1/voices/{voice_id}"): "foreign", ("POST", "/v1/synthesize"): "foreign",
    ("GET", "/v1/jobs/{job_id}"): "foreign", ("GET", "/v1/jobs/{job_id}/audio"): "foreign",
    ("POST", "/v1/jobs/{job_id}/complete"): "callback", ("POST", "/v1/uploads"): "foreign",
    ("GET", "/v1/usage"): "foreign", ("DELETE", "/v1/account"): "foreign",
    ("POST", "/v1/jobs/{job_id}/chunks"): "callback", ("POST", "/v1/audio/speech"): "foreign",
    ("GET", "/v1/audio/voices"): "foreign", ("GET", "/v1/models"): "foreign",
}
BILLING_PATHS = ("/v1/signup", "/v1/checkout", "/v1/webhooks")


def assert_404(r, code: str, *secrets: str) -> None:
    assert r.status_code == 404, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    for secret in secrets:
        assert secret not in r.text


@pytest.fixture(scope="module")
def owner(client, wavs) -> dict:
    """Account A: a custom voice, a ready job with audio, an upload."""
    key = client.new_key(label="owner", rate_per_minute=100_000)
    voice = client.create_voice(key, wavs.valid_wav(6.0), name="owner's secret voice", ref_text="owner words").json()
    r = client.http.post("/v1/synthesize", json={"voice_id": voice["voice_id"], "text": "Owner only audio."},
                         headers=client.auth(key))
    job = client.wait_job(key, r.json()["job_id"])
    assert job["status"] == "ready"
    up = client.http.post("/v1/uploads", headers=client.auth(key), data={"purpose": "voice_clone"},
                          files={"file": ("ref.wav", io.BytesIO(wavs.valid_wav(6.0)), "audio/wav")})
    assert up.status_code == 201, up.text
    return {"key": key, "voice": voice, "job": job, "upload": up.json()}


@pytest.fixture(scope="module")
def intruder(client) -> dict:
    return client.new_key(label="intruder", rate_per_minute=100_000)


def test_the_matrix_covers_every_route(client):
    spec = client.http.get("/openapi.json").json()
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops if not p.startswith(BILLING_PATHS)}
    assert routes == set(COVERED), routes ^ set(COVERED)


def test_foreign_voice_is_404_everywhere(client, owner, intruder):
    vid = owner["voice"]["voice_id"]
    unknown = str(uuid.uuid4())
    foreign = client.http.get(f"/v1/voices/{vid}", headers=client.auth(intruder))
    assert_404(foreign, "voice_not_found", "owner's secret voice", "owner words")
    # Indistinguishable from a voice that does not exist.
    absent = client.http.get(f"/v1/voices/{unknown}", headers=client.auth(intruder))
    assert foreign.json()["error"]["message"].replace(vid, "ID") == absent.json()["error"]["message"].replace(
        unknown, "ID")
    assert_404(client.http.delete(f"/v1/voices/{vid}", headers=client.auth(intruder)), "voice_not_found")
    assert_404(client.http.post("/v1/synthesize", json={"voice_id": vid, "text": "Speak for me."},
                                headers=client.auth(intruder)), "voice_not_found", "owner's secret voice")
    listed = client.http.get("/v1/voices", headers=client.auth(intruder))
    assert listed.status_code == 200 and vid not in listed.text and "owner's secret voice" not in listed.text
    # The owner still has it, intact.
    mine = client.http.get(f"/v1/voices/{vid}", headers=client.auth(owner["key"]))
    assert mine.status_code == 200 and mine.json()["name"] == "owner's secret voice"


def test_foreign_job_and_audio_are_404(client, owner, intruder):
    job_id = owner["job"]["job_id"]
    assert_404(client.http.get(f"/v1/jobs/{job_id}", headers=client.auth(intruder)), "job_not_found",
               owner["job"]["audio_url"], owner["voice"]["voice_id"])
    audio = client.http.get(f"/v1/jobs/{job_id}/audio", headers=client.auth(intruder))
    assert_404(audio, "job_not_found")
    assert not audio.content.startswith(b"RIFF") and "X-Job-Id" not in audio.headers
    assert client.http.get(f"/v1/jobs/{job_id}/audio", headers=client.auth(owner["key"])).status_code == 200


def test_foreign_upload_cannot_become_a_voice(client, owner, intruder):
    r = client.http.post("/v1/voices", headers=client.auth(intruder),
                         data={"name": "stolen", "upload_id": owner["upload"]["upload_id"]})
    assert r.status_code == 404, r.text
    assert set(r.json()) == {"error"}
    listed = client.http.get("/v1/voices", headers=client.auth(intruder)).json()
    assert "stolen" not in {v["name"] for v in listed}


def test_idempotency_keys_do_not_cross_accounts(client, owner, intruder, wavs):
    idem = {"Idempotency-Key": f"shared-{uuid.uuid4()}"}
    body = {"voice_id": owner["voice"]["voice_id"], "text": "Owner only audio."}
    first = client.http.post("/v1/synthesize", json=body, headers={**client.auth(owner["key"]), **idem})
    assert first.status_code == 200 and first.headers["X-Cache"] == "HIT"
    # Same key string, same body, other account: no replay of the owner's audio, a 404 of its own.
    other = client.http.post("/v1/synthesize", json=body, headers={**client.auth(intruder), **idem})
    assert_404(other, "voice_not_found")
    assert "Idempotent-Replayed" not in other.headers


def test_usage_is_the_callers_own(client, owner, intruder):
    mine = client.http.get("/v1/usage", headers=client.auth(intruder))
    theirs = client.http.get("/v1/usage", headers=client.auth(owner["key"]))
    assert mine.status_code == theirs.status_code
    assert owner["key"]["account_id"] not in mine.text


def test_admin_and_callback_routes_refuse_a_user_key(client, owner, intruder):
    auth = client.auth(intruder)
    key_id, account = owner["key"]["key_id"], owner["key"]["account_id"]
    for method, path, body in (("POST", "/v1/keys", {}), ("GET", "/v1/keys", None),
                               ("PATCH", f"/v1/keys/{key_id}", {"rate_per_minute": 1}),
                               ("DELETE", f"/v1/keys/{key_id}", None),
                               ("DELETE", f"/v1/admin/accounts/{account}", None),
                               ("GET", f"/v1/admin/purges/{uuid.uuid4()}", None),
                               ("POST", f"/v1/jobs/{owner['job']['job_id']}/complete",
                                {"job_id": owner["job"]["job_id"], "error": "sabotage"}),
                               ("POST", f"/v1/jobs/{owner['job']['job_id']}/chunks",
                                {"job_id": owner["job"]["job_id"], "stream_to": "x", "stream_id": "y", "seq": 0})):
        r = client.http.request(method, path, json=body, headers=auth)
        assert r.status_code == 401, (method, path, r.text)
        assert set(r.json()) == {"error"} and account not in r.text
    # Nothing changed for the owner.
    assert client.http.get(f"/v1/jobs/{owner['job']['job_id']}", headers=client.auth(owner["key"])).json()[
        "status"] == "ready"
    keys = client.http.get("/v1/keys", headers=client.admin(), params={"account_id": account}).json()
    assert keys[0]["revoked_at"] is None and keys[0]["rate_per_minute"] == 100_000


def test_deleting_another_account_is_impossible_from_a_key(client, owner, wavs):
    """DELETE /v1/account purges the caller's account only."""
    victim_of_nothing = client.new_key(label="leaver")
    client.create_voice(victim_of_nothing, wavs.valid_wav(5.5), name="leaving")
    r = client.http.delete("/v1/account", headers=client.auth(victim_of_nothing))
    assert r.status_code in (200, 202), r.text
    assert r.json()["account_id"] == victim_of_nothing["account_id"]
    assert client.http.get(f"/v1/voices/{owner['voice']['voice_id']}",
                           headers=client.auth(owner["key"])).status_code == 200
    assert client.http.get(f"/v1/jobs/{owner['job']['job_id']}/audio",
                           headers=client.auth(owner["key"])).status_code == 200


def test_openai_routes_never_show_or_speak_another_accounts_voice(client, owner, intruder):
    voice = owner["voice"]
    listed = client.http.get("/v1/audio/voices", headers=client.auth(intruder))
    assert listed.status_code == 200
    assert voice["voice_id"] not in listed.text and voice["name"] not in listed.text
    # The owner's voice, by id or by name, is refused exactly as a voice that does not exist.
    answers = []
    for ref in (voice["voice_id"], {"id": voice["voice_id"]}, voice["name"], str(uuid.uuid4())):
        r = client.http.post("/v1/audio/speech", json={"model": "tts-1", "voice": ref, "input": "Owner only audio."},
                             headers=client.auth(intruder))
        assert r.status_code == 400 and r.json()["error"]["code"] == "voice_not_found", r.text
        assert owner["key"]["account_id"] not in r.text
        answers.append(r.json()["error"]["type"])
    assert set(answers) == {"invalid_request_error"}
    models = client.http.get("/v1/models", headers=client.auth(intruder))
    assert models.status_code == 200 and owner["key"]["account_id"] not in models.text
