"""StorageSettings: R2 endpoint/region, generic S3, fail-fast secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from timbre_storage.adapters.blob import FsBlobStore, S3BlobStore, build_blob_store
from timbre_storage.settings import DEV_SIGNING_KEY, StorageSettings

R2_ACCOUNT = "ea63931e6e8ff54c5be60feacd3026d6"
STRONG_KEY = "k" * 40


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("STORAGE_", "R2_", "S3_", "TIMBRE_ENV", "DATABASE_URL")):
            monkeypatch.delenv(name)


def make(**env: Any) -> StorageSettings:
    return StorageSettings(_env_file=None, **env)


def r2_env() -> dict[str, str]:
    return {
        "storage_backend": "s3",
        "r2_account_id": R2_ACCOUNT,
        "r2_access_key_id": "AKR2",
        "r2_secret_access_key": "r2-secret-value",
        "r2_bucket_name": "timbre-audio",
    }


def test_r2_settings_build_endpoint_and_region() -> None:
    conn = make(**r2_env()).s3_connection()
    assert conn.endpoint_url == f"https://{R2_ACCOUNT}.r2.cloudflarestorage.com"
    assert conn.region == "auto"
    assert conn.bucket == "timbre-audio"
    assert conn.access_key_id == "AKR2"
    store = S3BlobStore.from_settings(make(**r2_env()))
    assert (store.endpoint_url, store.region, store.bucket) == (conn.endpoint_url, "auto", "timbre-audio")


def test_r2_from_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in r2_env().items():
        monkeypatch.setenv(name.upper(), value)
    conn = make().s3_connection()
    assert conn.endpoint_url == f"https://{R2_ACCOUNT}.r2.cloudflarestorage.com"


def test_secrets_never_in_repr() -> None:
    settings = make(**r2_env())
    assert "r2-secret-value" not in repr(settings)
    assert "r2-secret-value" not in repr(settings.s3_connection())
    assert "r2-secret-value" not in repr(S3BlobStore.from_settings(settings))
    fs = make(storage_signing_key=STRONG_KEY)
    assert STRONG_KEY not in repr(fs)


def test_r2_partial_config_fails_fast_naming_what_is_missing() -> None:
    env = r2_env()
    del env["r2_secret_access_key"]
    with pytest.raises(ValidationError, match="R2_SECRET_ACCESS_KEY"):
        make(**env)


def test_r2_account_id_must_be_the_hex_account_id() -> None:
    with pytest.raises(ValidationError, match="R2_ACCOUNT_ID"):
        make(**{**r2_env(), "r2_account_id": f"https://{R2_ACCOUNT}.r2.cloudflarestorage.com"})


def test_generic_s3_endpoint() -> None:
    conn = make(
        storage_backend="s3",
        s3_endpoint_url="http://minio:9000",
        s3_region="eu-west-1",
        s3_access_key_id="AK",
        s3_secret_access_key="SK",
        s3_bucket="b",
    ).s3_connection()
    assert (conn.endpoint_url, conn.region, conn.bucket) == ("http://minio:9000", "eu-west-1", "b")
    with pytest.raises(ValidationError, match="S3_BUCKET"):
        make(storage_backend="s3", s3_access_key_id="AK", s3_secret_access_key="SK")


def test_fs_signing_key_required_outside_dev() -> None:
    with pytest.raises(ValidationError, match="STORAGE_SIGNING_KEY"):
        make(timbre_env="prod")
    with pytest.raises(ValidationError, match="STORAGE_SIGNING_KEY"):
        make(timbre_env="test")
    with pytest.raises(ValidationError, match="STORAGE_SIGNING_KEY"):
        make(timbre_env="production", storage_signing_key="changeme")
    with pytest.raises(ValidationError, match="STORAGE_SIGNING_KEY"):
        make(timbre_env="staging", storage_signing_key="short")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5", "storage", "192.168.1.2"])
def test_fs_dev_default_key_refused_unless_the_url_server_is_on_loopback(host: str) -> None:
    """The development key is public: with TIMBRE_ENV unset (dev) it may sign only URLs nobody else can reach."""
    with pytest.raises(ValidationError, match="STORAGE_SIGNING_KEY"):
        make(storage_http_host=host)
    # A real key makes any interface fine.
    assert make(storage_http_host=host, storage_signing_key=STRONG_KEY).signing_key_bytes() == STRONG_KEY.encode()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_fs_dev_default_key_on_loopback(host: str) -> None:
    assert make(storage_http_host=host).signing_key_bytes() == DEV_SIGNING_KEY.encode()


def test_fs_dev_default_key_only_in_dev() -> None:
    settings = make(timbre_env="dev")
    assert settings.signing_key_bytes() == DEV_SIGNING_KEY.encode()
    assert make().signing_key_bytes() == DEV_SIGNING_KEY.encode()  # TIMBRE_ENV defaults to dev (common)
    with pytest.raises(ValidationError):
        make(timbre_env="prod", storage_signing_key=DEV_SIGNING_KEY)
    assert make(timbre_env="prod", storage_signing_key=STRONG_KEY).signing_key_bytes() == STRONG_KEY.encode()


def test_defaults() -> None:
    settings = make(timbre_env="dev")
    assert settings.storage_backend == "fs"
    assert settings.storage_root == Path("./var/blobs")
    assert settings.storage_public_url == "http://127.0.0.1:8001"


async def test_build_blob_store_switches_on_backend(tmp_path: Path) -> None:
    fs = await build_blob_store(make(storage_signing_key=STRONG_KEY, storage_root=tmp_path))
    assert isinstance(fs, FsBlobStore) and fs.root == tmp_path.resolve()
    s3 = await build_blob_store(make(**r2_env()))
    try:
        assert isinstance(s3, S3BlobStore)
        assert s3.client.meta.endpoint_url == f"https://{R2_ACCOUNT}.r2.cloudflarestorage.com"
        assert s3.client.meta.region_name == "auto"
    finally:
        await s3.close()
