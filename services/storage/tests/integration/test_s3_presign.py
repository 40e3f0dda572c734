"""S3 presigned URLs recomputed with botocore's own SigV4 signer for a frozen clock."""

from __future__ import annotations

import datetime as dt
from urllib.parse import parse_qs, quote, urlsplit

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from timbre_storage.adapters.blob import S3BlobStore
from timbre_storage.settings import StorageSettings

FROZEN = dt.datetime(2026, 11, 5, 12, 34, 56)
R2_ACCOUNT = "ea63931e6e8ff54c5be60feacd3026d6"


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> dt.datetime:
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: FROZEN)
    return FROZEN


def expected_url(
    endpoint: str, bucket: str, key: str, region: str, secret: str, expires: int, access_key: str = "AK-TEST"
) -> str:
    """What botocore's S3 SigV4 query signer produces for this request at the frozen time."""
    request = AWSRequest(method="GET", url=f"{endpoint}/{bucket}/{quote(key, safe='/~')}")
    botocore.auth.S3SigV4QueryAuth(Credentials(access_key, secret), "s3", region, expires=expires).add_auth(request)
    return request.url


def signature(url: str) -> str:
    return parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]


async def test_r2_presigned_url_signature(frozen_clock: dt.datetime) -> None:
    settings = StorageSettings(
        _env_file=None,
        storage_backend="s3",
        r2_account_id=R2_ACCOUNT,
        r2_access_key_id="AK-TEST",
        r2_secret_access_key="r2-secret",
        r2_bucket_name="timbre-audio",
    )
    async with S3BlobStore.from_settings(settings) as store:
        key = "generations/acc1/2026/11/05/123456-job1.wav"
        url = await store.presign_get(key)
    endpoint = f"https://{R2_ACCOUNT}.r2.cloudflarestorage.com"
    query = parse_qs(urlsplit(url).query)
    assert url.startswith(f"{endpoint}/timbre-audio/{key}?")
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Credential"] == ["AK-TEST/20261105/auto/s3/aws4_request"]
    assert query["X-Amz-Date"] == ["20261105T123456Z"]
    assert query["X-Amz-Expires"] == ["3600"]
    assert query["X-Amz-SignedHeaders"] == ["host"]
    good = expected_url(endpoint, "timbre-audio", key, "auto", "r2-secret", 3600)
    assert signature(url) == signature(good)
    # The check can fail: another secret, region, key or expiry signs differently.
    assert signature(url) != signature(expected_url(endpoint, "timbre-audio", key, "auto", "wrong", 3600))
    assert signature(url) != signature(expected_url(endpoint, "timbre-audio", key, "us-east-1", "r2-secret", 3600))
    assert signature(url) != signature(expected_url(endpoint, "timbre-audio", key + "x", "auto", "r2-secret", 3600))
    assert signature(url) != signature(expected_url(endpoint, "timbre-audio", key, "auto", "r2-secret", 60))


async def test_custom_expiry_against_local_server(frozen_clock: dt.datetime, s3_store: S3BlobStore) -> None:
    key = "voices/custom/acc1/v1.wav"
    url = await s3_store.presign_get(key, expires_in=120)
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["120"]
    good = expected_url(
        s3_store.endpoint_url or "", s3_store.bucket, key, "us-east-1", "test-secret-key", 120, "test-access-key"
    )
    assert signature(url) == signature(good)
    with pytest.raises(ValueError):
        await s3_store.presign_get(key, expires_in=8 * 24 * 3600)
