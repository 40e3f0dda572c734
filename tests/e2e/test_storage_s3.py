"""The platform on STORAGE_BACKEND=s3 against a real S3-compatible HTTP server (moto) started here.

The same core flow as on fs: custom voice (the worker fetches its reference through an S3 presigned URL),
synthesis, download, audio_url, cache hit, upload, self-heal, sweep and purge. moto checks no signature,
so each presigned URL is recomputed with botocore's own SigV4 signer at the URL's own timestamp.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from tests.e2e.conftest import running_platform
from timbre_common.catalogue import SYSTEM_VOICES

pytestmark = pytest.mark.e2e
JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")
ACCESS_KEY, SECRET_KEY, REGION = "e2e-access-key", "e2e-secret-key", "us-east-1"


class _RequestLog(logging.Handler):
    """The moto server's request lines (werkzeug logs one per request, query string included)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def moto() -> Iterator[dict[str, Any]]:
    """moto in server mode on loopback, a fresh bucket, and a log of the requests it served."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    requests = _RequestLog()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.INFO)
    werkzeug.addHandler(requests)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"timbre-e2e-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                      aws_secret_access_key=SECRET_KEY, config=Config(s3={"addressing_style": "path"}))
    s3.create_bucket(Bucket=bucket)
    try:
        yield {"endpoint": endpoint, "bucket": bucket, "s3": s3, "requests": requests}
    finally:
        werkzeug.removeHandler(requests)
        server.stop()


@pytest.fixture(scope="module")
def s3_client(database_url: str, amqp_url: str, moto: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    """A platform whose storage service keeps the bucket in moto (STORAGE_ROOT points nowhere it may write)."""
    root = tmp_path_factory.mktemp("s3platform")
    overrides = {"STORAGE_BACKEND": "s3", "S3_ENDPOINT_URL": moto["endpoint"], "S3_BUCKET": moto["bucket"],
                 "S3_ACCESS_KEY_ID": ACCESS_KEY, "S3_SECRET_ACCESS_KEY": SECRET_KEY, "S3_REGION": REGION,
                 "STORAGE_ROOT": str(root / "must-stay-empty"), "STORAGE_SIGNING_KEY": ""}
    with running_platform(database_url, amqp_url, root, overrides=overrides) as c:
        # A second storage replica: RPC, events and the sweeper then run on two processes at once.
        c.platform.start_extra("storage_b", "timbre_storage", {})
        yield c
    assert not (root / "must-stay-empty").exists(), "the s3 backend wrote to the local directory"


def _keys(moto: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key in the bucket under prefix, listed by boto3."""
    pages = moto["s3"].get_paginator("list_objects_v2").paginate(Bucket=moto["bucket"], Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _check_presigned(url: str, moto: dict[str, Any], key: str, expires: int = 3600) -> None:
    """The URL is exactly what botocore's S3 SigV4 query signer produces for this key at the URL's time."""
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert f"{parts.scheme}://{parts.netloc}" == moto["endpoint"]
    assert parts.path == f"/{moto['bucket']}/{key}", parts.path
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and query["X-Amz-SignedHeaders"] == "host"
    signed_at = dt.datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    assert query["X-Amz-Credential"] == f"{ACCESS_KEY}/{signed_at:%Y%m%d}/{REGION}/s3/aws4_request"
    assert int(query["X-Amz-Expires"]) == expires
    assert abs((dt.datetime.now(dt.UTC).replace(tzinfo=None) - signed_at).total_seconds()) < 300

    def botocore_signature(secret: str, region: str = REGION) -> str:
        original = botocore.auth.get_current_datetime
        botocore.auth.get_current_datetime = lambda *a, **k: signed_at  # the URL's own clock
        try:
            request = AWSRequest(method="GET", url=f"{moto['endpoint']}/{moto['bucket']}/{key}")
            botocore.auth.S3SigV4QueryAuth(Credentials(ACCESS_KEY, secret), "s3", region,
                                           expires=expires).add_auth(request)
        finally:
            botocore.auth.get_current_datetime = original
        return parse_qs(urlsplit(request.url).query)["X-Amz-Signature"][0]

    assert query["X-Amz-Signature"] == botocore_signature(SECRET_KEY)
    # The comparison can fail: another secret or region signs differently.
    assert query["X-Amz-Signature"] != botocore_signature("another-secret")
    assert query["X-Amz-Signature"] != botocore_signature(SECRET_KEY, "auto")


def _ready_job(client: Any, key: dict, voice_id: str, text: str) -> dict:
    r = client.http.post("/v1/synthesize", json={"voice_id": voice_id, "text": text}, headers=client.auth(key))
    assert r.status_code == 202 and r.headers["X-Cache"] == "MISS", r.text
    job = client.wait_job(key, r.json()["job_id"])
    assert job["status"] == "ready", job
    return job


def _generation_key(moto: dict[str, Any], account: str, job_id: str) -> str:
    found = [k for k in _keys(moto, f"generations/{account}/") if k.endswith(f"-{job_id}.wav")]
    assert len(found) == 1, found
    return found[0]


def _presigned_gets(moto: dict[str, Any], key: str) -> int:
    return sum(1 for line in moto["requests"].lines
               if f'"GET /{moto["bucket"]}/{key}?' in line and "X-Amz-Signature=" in line)


def _poll(what: str, check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout}s")


def test_core_flow_on_s3(s3_client, moto, wavs):
    client = s3_client
    key = client.new_key()
    account = key["account_id"]
    # Custom voice: its permanent reference lands in the bucket at the seed's key.
    voice = client.create_voice(key, wavs.valid_wav(6.0), name="s3 voice")
    assert voice.status_code == 201, voice.text
    voice_id = voice.json()["voice_id"]
    reference_key = f"voices/custom/{account}/{voice_id}.wav"
    assert _keys(moto, f"voices/custom/{account}/") == [reference_key]
    fetched_before = _presigned_gets(moto, reference_key)
    text = f"Stored in an S3 bucket, test {uuid.uuid4().int % 10000}."
    job = _ready_job(client, key, voice_id, text)
    # The worker took the reference through a presigned S3 URL (it holds no bucket credentials to do otherwise).
    assert _presigned_gets(moto, reference_key) > fetched_before, moto["requests"].lines[-20:]
    generation = _generation_key(moto, account, job["job_id"])
    created = dt.datetime.fromisoformat(job["created_at"]).astimezone(dt.UTC)
    assert generation == f"generations/{account}/{created:%Y/%m/%d/%H%M%S}-{job['job_id']}.wav"
    audio = client.http.get(f"/v1/jobs/{job['job_id']}/audio", headers=client.auth(key))
    assert audio.status_code == 200 and audio.content[:4] == b"RIFF"
    assert audio.content == moto["s3"].get_object(Bucket=moto["bucket"], Key=generation)["Body"].read()
    # audio_url: an S3 presigned GET valid one hour, signed as botocore signs, serving the same bytes.
    assert dt.datetime.fromisoformat(job["expires_at"]) - dt.datetime.fromisoformat(job["completed_at"]) \
        > dt.timedelta(days=6, hours=23)
    _check_presigned(job["audio_url"], moto, generation)
    assert client.http.get(job["audio_url"]).content == audio.content
    hit = client.http.post("/v1/synthesize", json={"voice_id": voice_id, "text": text}, headers=client.auth(key))
    assert hit.status_code == 200 and hit.headers["X-Cache"] == "HIT" and hit.content == audio.content

    # The gateway reads the hit from the bucket itself (GetObject with storage's credentials, read-only): once
    # job.ready has reached it, a hit leaves the dispatcher's cache-lookup counter where it was.
    def dispatcher_hits() -> float:
        return sum(v for (name, labels), v in client.scrape("dispatcher").items()
                   if name == "timbre_synthesis_cache_lookups_total" and dict(labels).get("result") == "hit")

    def served_by_gateway() -> bool:
        before = dispatcher_hits()
        again = client.http.post("/v1/synthesize", json={"voice_id": voice_id, "text": text},
                                 headers=client.auth(key))
        return again.status_code == 200 and again.content == audio.content and dispatcher_hits() == before

    _poll("a hit read from the bucket by the gateway", served_by_gateway)
    # Uploads: a generic one (30 days) and a voice-clone one (a day, unless a voice is made from it), each with a
    # working presigned URL.
    data = wavs.valid_wav(6.0)
    for purpose, prefix in ((None, "uploads"), ("voice_clone", "voice-recordings")):
        r = client.http.post("/v1/uploads", headers=client.auth(key), data={"purpose": purpose} if purpose else {},
                             files={"file": ("clip.wav", io.BytesIO(data), "audio/wav")})
        assert r.status_code == 201, r.text
        upload = r.json()
        stored = [k for k in _keys(moto, f"{prefix}/{account}/") if k.endswith(f"-{upload['upload_id']}.wav")]
        assert len(stored) == 1, _keys(moto)
        _check_presigned(upload["url"], moto, stored[0])
        assert client.http.get(upload["url"]).content == data
        days = (dt.datetime.fromisoformat(upload["expires_at"]) - dt.datetime.now(dt.UTC)).total_seconds() / 86400
        assert round(days) == (1 if purpose == "voice_clone" else 30), upload
    from_upload = client.http.post("/v1/voices", headers=client.auth(key),
                                   files={"name": (None, "from upload"), "upload_id": (None, upload["upload_id"])})
    assert from_upload.status_code == 201, from_upload.text


def test_self_heal_and_sweep_on_s3(s3_client, moto):
    client = s3_client
    key = client.new_key()
    account = key["account_id"]
    vanished = _ready_job(client, key, JOE.voice_id, f"Vanishing audio {uuid.uuid4().int % 10000}.")
    moto["s3"].delete_object(Bucket=moto["bucket"], Key=_generation_key(moto, account, vanished["job_id"]))
    r = client.http.get(f"/v1/jobs/{vanished['job_id']}/audio", headers=client.auth(key))
    assert r.status_code == 500 and r.json()["error"]["code"] == "audio_missing", r.text
    view = client.http.get(f"/v1/jobs/{vanished['job_id']}", headers=client.auth(key)).json()
    assert view["status"] == "failed" and view["error_code"] == "audio_missing"
    expiring = _ready_job(client, key, JOE.voice_id, f"Expiring audio {uuid.uuid4().int % 10000}.")
    object_key = _generation_key(moto, account, expiring["job_id"])
    assert client.sql("UPDATE storage.objects SET expires_at = now() - interval '1 second' WHERE key = $1 "
                        "RETURNING key", object_key)
    _poll("expired object swept from the bucket", lambda: object_key not in _keys(moto, f"generations/{account}/"))
    _poll("index row gone", lambda: not client.sql("SELECT 1 FROM storage.objects WHERE key = $1", object_key))
    # Read the job once the dispatcher has handled objects.expired (an earlier poll would self-heal it).
    _poll("job marked expired", lambda: client.sql("SELECT 1 FROM dispatch.jobs WHERE job_id = $1 AND "
                                                     "status = 'failed'", uuid.UUID(expiring["job_id"])))
    job = client.http.get(f"/v1/jobs/{expiring['job_id']}", headers=client.auth(key)).json()
    assert job["status"] == "failed" and job["error_code"] == "audio_expired", job


def _swept(client: Any) -> dict[str, int]:
    """Objects each storage replica reports having swept so far (from its JSON log)."""
    return {name: sum(json.loads(line)["objects"] for line in client.platform.log(name).splitlines()
                      if '"expired_objects_swept"' in line)
            for name in ("storage", "storage_b")}


def test_two_storage_replicas_sweep_each_expired_object_once(s3_client, moto, wavs):
    client = s3_client
    key = client.new_key()
    account = key["account_id"]
    assert client.platform.exited() == {}, client.tail_logs()
    uploads = []
    for _ in range(12):
        r = client.http.post("/v1/uploads", headers=client.auth(key),
                             files={"file": ("a.wav", io.BytesIO(wavs.valid_wav(0.5)), "audio/wav")})
        assert r.status_code == 201, r.text
        uploads.append(r.json())
    assert len(_keys(moto, f"uploads/{account}/")) == 12
    before = _swept(client)
    expired = client.sql("UPDATE storage.objects SET expires_at = now() - interval '1 second' "
                           "WHERE account_id = $1 AND key LIKE 'uploads/%' RETURNING key", account)
    assert len(expired) == 12
    _poll("expired uploads swept", lambda: _keys(moto, f"uploads/{account}/") == [])
    _poll("sweeps logged", lambda: sum(_swept(client).values()) - sum(before.values()) >= 12)
    time.sleep(1.5)  # one more sweep interval (1 s): a second claim of any row would show as a count above 12
    after = _swept(client)
    print("swept per replica:", {n: after[n] - before[n] for n in after})
    assert sum(after.values()) - sum(before.values()) == 12, (before, after)
    assert not client.sql("SELECT 1 FROM storage.uploads WHERE account_id = $1", account)
    for upload in uploads:
        assert client.http.get(upload["url"]).status_code == 404


def test_purge_empties_the_accounts_prefixes_in_the_bucket(s3_client, moto, wavs):
    client = s3_client
    doomed, other = client.new_key(), client.new_key()
    for key in (doomed, other):
        assert client.create_voice(key, wavs.valid_wav(6.0), name="v").status_code == 201
        for purpose in ({}, {"purpose": "voice_clone"}):
            assert client.http.post("/v1/uploads", headers=client.auth(key), data=purpose,
                                    files={"file": ("a.wav", io.BytesIO(wavs.valid_wav(1.0)), "audio/wav")}
                                    ).status_code == 201
        _ready_job(client, key, JOE.voice_id, f"Purge on s3 {uuid.uuid4().int % 10000}.")

    def prefixes(account: str) -> list[str]:
        return [f"voices/custom/{account}/", f"generations/{account}/", f"uploads/{account}/",
                f"voice-recordings/{account}/"]

    for key in (doomed, other):
        assert all(_keys(moto, p) for p in prefixes(key["account_id"])), _keys(moto)
    others_before = [k for p in prefixes(other["account_id"]) for k in _keys(moto, p)]
    r = client.http.delete("/v1/account", headers=client.auth(doomed))
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text
    assert set(r.json()["confirmed"]) == {"gateway", "voices", "dispatcher", "storage", "billing"}
    assert not any(doomed["account_id"] in k for k in _keys(moto)), _keys(moto)
    assert not client.sql("SELECT key FROM storage.objects WHERE account_id = $1", doomed["account_id"])
    assert [k for p in prefixes(other["account_id"]) for k in _keys(moto, p)] == others_before
    assert client.http.get("/v1/voices", headers=client.auth(doomed)).status_code == 401
    assert client.http.get("/v1/voices", headers=client.auth(other)).status_code == 200
