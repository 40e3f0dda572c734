"""Storage end to end on the fs backend: uploads and retention, signed URLs, self-heal, sweeper, purge, key layout."""
from __future__ import annotations

import asyncio
import io
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from timbre_common.catalogue import SYSTEM_VOICES
from timbre_common.contracts.accounts import PURGING_SERVICES
from timbre_storage.adapters.blob import FsBlobStore

pytestmark = pytest.mark.e2e
JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")
GENERATION_KEY = re.compile(r"^generations/(?P<account>[0-9a-f-]{36})/(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/"
                            r"(?P<hms>\d{6})-(?P<job>[0-9a-f-]{36})\.wav$")
# The purge's own receipt: it names the account so GET /v1/admin/purges/{id} can answer who was purged.
PURGE_RECEIPTS = {("gateway", "purges")}


def _root(client: Any) -> Path:
    return Path(client.env["STORAGE_ROOT"])


def _files_under(client: Any, prefix: str) -> list[str]:
    """Object keys (visible files) under a prefix of the fs bucket."""
    base = _root(client) / prefix
    if not base.exists():
        return []
    return sorted(p.relative_to(_root(client)).as_posix() for p in base.rglob("*")
                  if p.is_file() and not p.name.startswith("."))


def _generation_file(client: Any, account_id: str, job_id: str) -> Path:
    found = list((_root(client) / "generations" / account_id).rglob(f"*-{job_id}.wav"))
    assert len(found) == 1, found
    return found[0]


def _upload(client: Any, key: dict, data: bytes, purpose: str | None = None, *, filename: str = "clip.wav",
            content_type: str = "audio/wav") -> Any:
    fields = {"purpose": purpose} if purpose is not None else {}
    return client.http.post("/v1/uploads", headers=client.auth(key), data=fields,
                            files={"file": (filename, io.BytesIO(data), content_type)})


def _synthesize(client: Any, key: dict, text: str) -> Any:
    return client.http.post("/v1/synthesize", json={"voice_id": JOE.voice_id, "text": text},
                            headers=client.auth(key))


def _ready_job(client: Any, key: dict, text: str) -> dict:
    r = _synthesize(client, key, text)
    assert r.status_code == 202 and r.headers["X-Cache"] == "MISS", r.text
    job = client.wait_job(key, r.json()["job_id"])
    assert job["status"] == "ready", job
    return job


def _poll(what: str, check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout}s")


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def _unique(label: str) -> str:
    return f"{label} number {uuid.uuid4().int % 100000}."


# Uploads and retention -------------------------------------------------------------------------------
@pytest.mark.parametrize("purpose", [None, "stt_input", "watermark_input", "audio_job_input", "voice_clone"])
def test_upload_expiry_follows_its_purpose_and_its_url_serves_the_bytes(client, wavs, purpose):
    key = client.new_key()
    data = wavs.valid_wav(2.0)
    r = _upload(client, key, data, purpose)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["purpose"] == (purpose or "upload") and body["size"] == len(data)
    if purpose == "voice_clone":
        # Kept a day unless a voice claims it (test_bounds: a voice made from it keeps it).
        lifetime = _parse(body["expires_at"]) - _parse(body["created_at"])
        assert abs(lifetime - timedelta(hours=24)) < timedelta(seconds=5), lifetime
    else:
        lifetime = _parse(body["expires_at"]) - _parse(body["created_at"])
        assert abs(lifetime - timedelta(days=30)) < timedelta(seconds=5), lifetime
    got = client.http.get(body["url"])
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"].startswith("audio/wav")
    # The URL is a signed fs URL valid one hour.
    expires = int(re.search(r"[?&]expires=(\d+)", body["url"]).group(1))
    assert 3500 < expires - time.time() <= 3600


def test_upload_rejects_an_unknown_purpose_and_a_missing_file(client, wavs):
    key = client.new_key()
    r = _upload(client, key, wavs.valid_wav(1.0), "forever")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_purpose"
    r = client.http.post("/v1/uploads", headers=client.auth(key), files={"purpose": (None, "stt_input")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_field"
    assert client.http.post("/v1/uploads", files={"file": ("a.wav", b"x", "audio/wav")}).status_code == 401


def test_an_uploaded_page_is_never_served_as_a_page(client, wavs):
    """A client claiming text/html gets its bytes back as a sandboxed download, not as a script on our origin."""
    key = client.new_key()
    page = b"<html><script>alert(document.cookie)</script></html>"
    r = _upload(client, key, page, "voice_clone", filename="x.html", content_type="text/html")
    assert r.status_code == 201, r.text
    assert r.json()["content_type"] == "application/octet-stream"
    served = client.http.get(r.json()["url"])
    assert served.status_code == 200 and served.content == page
    assert served.headers["content-type"] == "application/octet-stream"
    assert served.headers["content-disposition"] == "attachment"
    assert "sandbox" in served.headers["content-security-policy"]
    assert served.headers["x-content-type-options"] == "nosniff"
    # Audio still plays inline.
    audio = _upload(client, key, wavs.valid_wav(1.0), "stt_input").json()
    played = client.http.get(audio["url"])
    assert played.headers["content-type"].startswith("audio/wav") and played.headers["content-disposition"] == "inline"


def test_voice_created_from_an_upload_id_and_not_from_another_accounts(client, wavs):
    owner, stranger = client.new_key(), client.new_key()
    upload = _upload(client, owner, wavs.valid_wav(6.0), "voice_clone").json()
    form = {"name": (None, "from upload"), "upload_id": (None, upload["upload_id"])}
    foreign = client.http.post("/v1/voices", headers=client.auth(stranger), files=form)
    assert foreign.status_code == 404, foreign.text
    assert foreign.json()["error"]["code"] == "upload_not_found"
    r = client.http.post("/v1/voices", headers=client.auth(owner), files=form)
    assert r.status_code == 201, r.text
    voice = r.json()
    assert voice["kind"] == "custom" and voice["name"] == "from upload"
    # The reference is copied to the voice's own permanent key, under the account's prefix.
    assert _files_under(client, f"voices/custom/{owner['account_id']}/") == \
        [f"voices/custom/{owner['account_id']}/{voice['voice_id']}.wav"]
    both = client.http.post("/v1/voices", headers=client.auth(owner), data={"name": "both",
                            "upload_id": upload["upload_id"]},
                            files={"ref_audio": ("r.wav", io.BytesIO(wavs.valid_wav(6.0)), "audio/wav")})
    assert both.status_code == 400 and both.json()["error"]["code"] == "conflicting_fields"


# Signed fs URLs ----------------------------------------------------------------------------------------
def test_tampered_and_expired_fs_urls_are_refused(client, wavs):
    key = client.new_key()
    first = _upload(client, key, wavs.valid_wav(1.0), "stt_input").json()["url"]
    second = _upload(client, key, wavs.valid_wav(1.5), "stt_input").json()["url"]
    assert client.http.get(first).status_code == 200
    base, query = first.split("?", 1)
    params = dict(p.split("=", 1) for p in query.split("&"))
    signature, expires = params["signature"], params["expires"]
    other_path = second.split("?", 1)[0]
    tampered = {
        "key": f"{other_path}?expires={expires}&signature={signature}",
        "expiry": f"{base}?expires={int(expires) + 3600}&signature={signature}",
        "signature": f"{base}?expires={expires}&signature={signature[:-2]}{'00' if signature[-2:] != '00' else '11'}",
        "no signature": f"{base}?expires={expires}",
    }
    for what, url in tampered.items():
        r = client.http.get(url)
        assert r.status_code == 403, (what, r.status_code)
        assert r.json()["error"]["code"] == "signature_invalid", what
    # A correctly signed URL whose hour is over: signed with the platform's key on a clock two hours back.
    object_key = base.split("/blobs/", 1)[1]
    past = FsBlobStore(_root(client), client.env["STORAGE_PUBLIC_URL"], client.env["STORAGE_SIGNING_KEY"].encode(),
                       clock=lambda: time.time() - 7200)
    stale = asyncio.run(past.presign_get(object_key, 3600))
    r = client.http.get(stale)
    assert r.status_code == 403 and r.json()["error"] == {"code": "url_expired",
                                                          "message": "The URL has expired; request a new one."}
    # The same signer with the right clock works: the refusal above is the expiry, not the signer.
    fresh = FsBlobStore(_root(client), client.env["STORAGE_PUBLIC_URL"], client.env["STORAGE_SIGNING_KEY"].encode())
    assert client.http.get(asyncio.run(fresh.presign_get(object_key, 60))).status_code == 200


# Self-heal ---------------------------------------------------------------------------------------------
def test_ready_job_whose_object_vanished_self_heals_to_failed(client):
    key = client.new_key()
    text = _unique("Self heal check")
    job = _ready_job(client, key, text)
    path = _generation_file(client, key["account_id"], job["job_id"])
    path.unlink()
    r = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key))
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "audio_missing"
    view = client.http.get(f"/v1/jobs/{job['job_id']}", headers=client.auth(key)).json()
    assert view["status"] == "failed" and view["error_code"] == "audio_missing" and view["error"], view
    assert "audio_url" not in view
    again = _synthesize(client, key, text)
    assert again.status_code == 202 and again.headers["X-Cache"] == "MISS", again.text
    assert again.json()["job_id"] != job["job_id"]
    assert client.wait_job(key, again.json()["job_id"])["status"] == "ready"


def test_polling_a_ready_job_whose_object_vanished_self_heals_too(client):
    key = client.new_key()
    job = _ready_job(client, key, _unique("Poll heal check"))
    _generation_file(client, key["account_id"], job["job_id"]).unlink()
    r = client.http.get(f"/v1/jobs/{job['job_id']}", headers=client.auth(key))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed" and r.json()["error_code"] == "audio_missing", r.json()


# Sweeper -----------------------------------------------------------------------------------------------
def test_sweeper_deletes_expired_audio_and_its_owners_forget_it(client):
    key = client.new_key()
    account = key["account_id"]
    text = _unique("Sweeper check")
    job = _ready_job(client, key, text)
    assert _parse(job["expires_at"]) - _parse(job["completed_at"]) > timedelta(days=6, hours=23)
    path = _generation_file(client, account, job["job_id"])
    object_key = path.relative_to(_root(client)).as_posix()
    assert client.sql("SELECT 1 FROM dispatch.cache_entries WHERE audio_key = $1", object_key)
    # An untouched object of the same account must survive the sweep.
    keep = _ready_job(client, key, _unique("Survivor"))
    updated = client.sql("UPDATE storage.objects SET expires_at = now() - interval '1 second' "
                           "WHERE key = $1 RETURNING key", object_key)
    assert len(updated) == 1
    # Past its retention the audio is gone for its owner: 410, never "missing". (Only storage's row is aged here;
    # the gateway's read model keeps the expiry announced with the audio and forgets it on objects.expired, so
    # the answer is checked once the sweep has run.)
    _poll("expired object swept", lambda: not path.exists() and not client.sql(
        "SELECT 1 FROM storage.objects WHERE key = $1", object_key))
    gone = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key))
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "audio_expired", gone.text
    _poll("cache entry dropped", lambda: not client.sql(
        "SELECT 1 FROM dispatch.cache_entries WHERE audio_key = $1", object_key))
    _poll("job marked expired", lambda: client.sql("SELECT 1 FROM dispatch.jobs WHERE job_id = $1 AND "
                                                     "status = 'failed'", uuid.UUID(job["job_id"])))
    view = client.http.get(f"/v1/jobs/{job['job_id']}", headers=client.auth(key)).json()
    assert view["status"] == "failed" and view["error_code"] == "audio_expired" and "audio_url" not in view, view
    again = _synthesize(client, key, text)
    assert again.status_code == 202 and again.headers["X-Cache"] == "MISS"
    assert again.json()["job_id"] != job["job_id"]
    kept = client.http.get(f"/v1/jobs/{keep['job_id']}/audio", headers=client.auth(key))
    assert kept.status_code == 200 and kept.content[:4] == b"RIFF"


# Key layout --------------------------------------------------------------------------------------------
def test_stored_keys_follow_the_seed_layout(client, wavs):
    key = client.new_key()
    account = key["account_id"]
    job = _ready_job(client, key, _unique("Layout check"))
    generation = _generation_file(client, account, job["job_id"]).relative_to(_root(client)).as_posix()
    match = GENERATION_KEY.fullmatch(generation)
    assert match, generation
    created = _parse(job["created_at"]).astimezone(UTC)
    assert match["account"] == account and match["job"] == job["job_id"]
    assert (match["y"], match["m"], match["d"], match["hms"]) == \
        (f"{created:%Y}", f"{created:%m}", f"{created:%d}", f"{created:%H%M%S}")
    voice = client.create_voice(key, wavs.valid_wav(6.0), name="layout").json()
    assert (_root(client) / f"voices/custom/{account}/{voice['voice_id']}.wav").is_file()
    # The extension is the sniffed type's, never the client's file name: bytes of no audio type are .bin.
    upload = _upload(client, key, b"not audio", filename="notes.txt", content_type="text/plain").json()
    uploads = _files_under(client, f"uploads/{account}/")
    assert len(uploads) == 1 and uploads[0].endswith(f"-{upload['upload_id']}.bin"), uploads
    assert re.fullmatch(rf"uploads/{account}/\d{{4}}/\d{{2}}/\d{{2}}/\d{{6}}-{upload['upload_id']}\.bin", uploads[0])
    wav = _upload(client, key, wavs.valid_wav(1.0), filename="page.html", content_type="text/html").json()
    assert [u for u in _files_under(client, f"uploads/{account}/") if wav["upload_id"] in u][0].endswith(".wav")


# Account purge -----------------------------------------------------------------------------------------
def _populate(client: Any, wavs: Any) -> dict[str, Any]:
    """An account with a custom voice, uploads of two classes and a ready job."""
    key = client.new_key()
    voice = client.create_voice(key, wavs.valid_wav(6.0), name="mine")
    assert voice.status_code == 201, voice.text
    generic = _upload(client, key, wavs.valid_wav(1.0)).json()
    clone = _upload(client, key, wavs.valid_wav(6.0), "voice_clone").json()
    job = _ready_job(client, key, _unique("Purge check"))
    return {"key": key, "account": key["account_id"], "voice": voice.json(), "uploads": [generic, clone], "job": job}


def _account_prefixes(account: str) -> list[str]:
    return [f"voices/custom/{account}/", f"generations/{account}/", f"uploads/{account}/",
            f"voice-recordings/{account}/"]


def _rows_of_account(client: Any, account: str) -> dict[str, int]:
    """Rows naming the account in every table of every schema that has an account_id column."""
    tables = client.sql("SELECT table_schema, table_name FROM information_schema.columns "
                          "WHERE column_name = 'account_id' AND table_schema NOT IN ('pg_catalog', "
                          "'information_schema') AND (table_schema, table_name) IN (SELECT table_schema, "
                          "table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE')")
    assert {(t["table_schema"], t["table_name"]) for t in tables} >= {
        ("gateway", "accounts"), ("gateway", "api_keys"), ("voices", "voices"), ("dispatch", "jobs"),
        ("dispatch", "cache_entries"), ("storage", "objects"), ("storage", "uploads"), ("billing", "customers"),
        ("billing", "usage_ledger")}, tables
    counts = {}
    for t in tables:
        # The outboxes hold events in flight (the purge's own confirmations among them) until the broker has them.
        if (t["table_schema"], t["table_name"]) in PURGE_RECEIPTS or t["table_name"] == "outbox":
            continue
        n = client.sql(f'SELECT count(*) AS n FROM "{t["table_schema"]}"."{t["table_name"]}" '
                         f"WHERE account_id::text = $1", account)[0]["n"]
        counts[f"{t['table_schema']}.{t['table_name']}"] = n
    return counts


def _assert_intact(client: Any, acct: dict[str, Any]) -> None:
    """Everything of an account still answers."""
    auth = client.auth(acct["key"])
    voices = client.http.get("/v1/voices", headers=auth)
    assert voices.status_code == 200 and acct["voice"]["voice_id"] in {v["voice_id"] for v in voices.json()}
    job = client.http.get(f"/v1/jobs/{acct['job']['job_id']}", headers=auth).json()
    assert job["status"] == "ready", job
    audio = client.http.get(f"/v1/jobs/{acct['job']['job_id']}/audio", headers=auth)
    assert audio.status_code == 200 and audio.content[:4] == b"RIFF"
    assert client.http.get(job["audio_url"]).status_code == 200
    for upload in acct["uploads"]:
        assert client.http.get(upload["url"]).status_code == 200
    for prefix in _account_prefixes(acct["account"]):
        assert _files_under(client, prefix), prefix


def _assert_purged(client: Any, acct: dict[str, Any], purge: dict) -> None:
    assert purge["status"] == "completed" and purge["account_id"] == acct["account"], purge
    assert set(purge["confirmed"]) == set(PURGING_SERVICES) == \
        {"gateway", "voices", "dispatcher", "storage", "billing"}, purge
    assert purge["confirmed"]["storage"] >= 4  # voice reference, two uploads, one generation
    for prefix in _account_prefixes(acct["account"]):
        assert _files_under(client, prefix) == [], prefix
        assert not (_root(client) / prefix).exists(), prefix
    leftovers = {table: n for table, n in _rows_of_account(client, acct["account"]).items() if n}
    assert leftovers == {}, leftovers
    r = client.http.get("/v1/voices", headers=client.auth(acct["key"]))
    assert r.status_code == 401, r.text
    for upload in acct["uploads"]:
        assert client.http.get(upload["url"]).status_code == 404
    assert client.http.get(acct["job"]["audio_url"]).status_code == 404


def _confirm_again(client: Any, purge_id: str, service: str, removed: int) -> None:
    """What the gateway does with a (repeated) account.purged confirmation, through its own repository."""
    from timbre_common.db import create_pool
    from timbre_gateway.adapters.repository import AccountRepository

    async def run() -> None:
        pool = await create_pool(client.env["DATABASE_URL"], schema="gateway", min_size=1, max_size=1)
        try:
            await AccountRepository(pool).confirm_purge(purge_id, service, removed, PURGING_SERVICES)
        finally:
            await pool.close()

    asyncio.run(run())


def _assert_populated(client: Any, acct: dict[str, Any]) -> None:
    """Before a purge every owning service holds rows of the account (so their absence after it means something)."""
    _poll("usage recorded", lambda: _rows_of_account(client, acct["account"])["billing.usage_ledger"] >= 1)
    counts = _rows_of_account(client, acct["account"])
    assert counts["storage.objects"] == 4 and counts["storage.uploads"] == 2, counts
    assert min(counts[t] for t in ("gateway.accounts", "gateway.api_keys", "voices.voices", "dispatch.jobs",
                                   "dispatch.cache_entries")) >= 1, counts


def test_delete_account_removes_every_object_and_row_and_spares_the_others(client, wavs):
    doomed, other = _populate(client, wavs), _populate(client, wavs)
    _assert_populated(client, doomed)
    r = client.http.delete("/v1/account", headers=client.auth(doomed["key"]))
    assert r.status_code == 200, r.text
    _assert_purged(client, doomed, r.json())
    receipt = client.http.get(f"/v1/admin/purges/{r.json()['purge_id']}", headers=client.admin())
    assert receipt.status_code == 200 and receipt.json() == r.json()
    # A redelivered purge on another replica confirms again with nothing left to remove: the receipt keeps
    # the first count of each service.
    _confirm_again(client, r.json()["purge_id"], "storage", 0)
    again = client.http.get(f"/v1/admin/purges/{r.json()['purge_id']}", headers=client.admin()).json()
    assert again["confirmed"] == r.json()["confirmed"] and again["status"] == "completed"
    _assert_intact(client, other)
    assert _rows_of_account(client, other["account"])["storage.objects"] == 4


def test_admin_purge_removes_every_object_and_row_and_spares_the_others(client, wavs):
    doomed, other = _populate(client, wavs), _populate(client, wavs)
    _assert_populated(client, doomed)
    assert client.http.delete(f"/v1/admin/accounts/{doomed['account']}",
                              headers=client.auth(other["key"])).status_code == 401
    r = client.http.delete(f"/v1/admin/accounts/{doomed['account']}", headers=client.admin())
    assert r.status_code == 200, r.text
    _assert_purged(client, doomed, r.json())
    _assert_intact(client, other)
    assert client.http.delete("/v1/admin/accounts/not-a-uuid", headers=client.admin()).status_code == 404
