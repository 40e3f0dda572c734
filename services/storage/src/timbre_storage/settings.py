"""Settings of the storage service, read from the environment."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from timbre_common.settings import CommonSettings, is_placeholder

from .domain import AccountLimits

DEV_SIGNING_KEY = "timbre-dev-signing-key-do-not-use-outside-dev"
# Beyond the common placeholders: words that only name an environment, and the dev default itself.
_WEAK_KEYS = {"changethis", "dev", "test", DEV_SIGNING_KEY}
_R2_ACCOUNT_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class S3Connection:
    """Everything an S3 client needs to reach one bucket."""

    endpoint_url: str | None
    region: str
    access_key_id: str
    secret_access_key: SecretStr
    bucket: str


def _is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only (an empty host or 0.0.0.0 binds every interface)."""
    value = host.strip().strip("[]").lower()
    if value == "localhost":
        return True
    try:
        return ipaddress.ip_address(value).is_loopback
    except ValueError:
        return False


class StorageSettings(CommonSettings):
    """Storage service settings (plus the common ones); fails fast on missing or placeholder secrets."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    storage_backend: Literal["fs", "s3"] = "fs"
    storage_root: Path = Path("./var/blobs")
    storage_public_url: str = "http://127.0.0.1:8001"
    storage_signing_key: SecretStr | None = None
    # Interface the fs URL server binds (its port comes from STORAGE_PUBLIC_URL).
    storage_http_host: str = "127.0.0.1"
    sweep_interval_s: float = 60.0
    # Objects one sweep transaction claims; replicas each claim their own batch.
    sweep_batch: int = Field(default=200, ge=1, le=10_000)
    # What one account may keep: live uploads (409 upload_limit_reached past it) and bytes of uploads plus
    # custom voice references (413 storage_quota_exceeded); an unclaimed voice_clone upload expires after the TTL.
    max_account_uploads: int = Field(default=1000, gt=0)
    max_account_stored_bytes: int = Field(default=1024 * 1024 * 1024, gt=0)
    voice_clone_upload_ttl_s: float = Field(default=24 * 3600, gt=0)

    r2_account_id: str | None = None
    r2_access_key_id: str | None = None
    r2_secret_access_key: SecretStr | None = None
    r2_bucket_name: str | None = None

    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_bucket: str | None = None

    def account_limits(self) -> AccountLimits:
        """The per-account storage caps."""
        return AccountLimits(max_uploads=self.max_account_uploads, max_bytes=self.max_account_stored_bytes,
                             voice_clone_ttl=timedelta(seconds=self.voice_clone_upload_ttl_s))

    @property
    def is_dev(self) -> bool:
        """True when running as a developer's local stack."""
        return self.timbre_env.strip().lower() == "dev"

    @property
    def uses_r2(self) -> bool:
        """True when the s3 backend targets Cloudflare R2 (R2_ACCOUNT_ID is set)."""
        return bool(self.r2_account_id)

    @model_validator(mode="after")
    def _check(self) -> StorageSettings:
        if self.storage_backend == "fs":
            self._check_signing_key()
        else:
            self.s3_connection()
        return self

    def _check_signing_key(self) -> None:
        key = self.storage_signing_key.get_secret_value() if self.storage_signing_key else ""
        if self.is_dev and not key:
            # The development key is public (it is in this file): URLs signed with it are only acceptable when
            # nobody but this machine can reach the server that honours them.
            if not _is_loopback(self.storage_http_host):
                raise ValueError(
                    f"STORAGE_SIGNING_KEY must be set when the fs URL server listens on {self.storage_http_host}: "
                    "the development key is public and is accepted only on a loopback address (127.0.0.1, ::1)"
                )
            self.storage_signing_key = SecretStr(DEV_SIGNING_KEY)
            return
        if is_placeholder(key) or key.strip().lower() in _WEAK_KEYS or len(key) < 32:
            raise ValueError(
                "STORAGE_SIGNING_KEY must be set to a random secret of at least 32 characters when "
                "STORAGE_BACKEND=fs (only TIMBRE_ENV=dev may leave it unset); "
                "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )

    def signing_key_bytes(self) -> bytes:
        """The fs backend's HMAC key."""
        if self.storage_signing_key is None:
            raise ValueError("STORAGE_SIGNING_KEY is not set")
        return self.storage_signing_key.get_secret_value().encode()

    def s3_connection(self) -> S3Connection:
        """R2 connection when R2_ACCOUNT_ID is set, else the generic S3_* one; raises on gaps."""
        if self.uses_r2:
            missing = [
                name
                for name, value in (
                    ("R2_ACCESS_KEY_ID", self.r2_access_key_id),
                    ("R2_SECRET_ACCESS_KEY", self.r2_secret_access_key),
                    ("R2_BUCKET_NAME", self.r2_bucket_name),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"STORAGE_BACKEND=s3 with R2_ACCOUNT_ID set also needs {', '.join(missing)}")
            account = (self.r2_account_id or "").strip()
            if not _R2_ACCOUNT_RE.fullmatch(account):
                raise ValueError(
                    "R2_ACCOUNT_ID must be the 32-character hex Cloudflare account id "
                    "(dashboard sidebar or dash.cloudflare.com/<account_id>/r2), not a URL or user id"
                )
            assert self.r2_access_key_id and self.r2_secret_access_key and self.r2_bucket_name
            return S3Connection(
                endpoint_url=f"https://{account}.r2.cloudflarestorage.com",
                region="auto",
                access_key_id=self.r2_access_key_id,
                secret_access_key=self.r2_secret_access_key,
                bucket=self.r2_bucket_name,
            )
        missing = [
            name
            for name, value in (
                ("S3_ACCESS_KEY_ID", self.s3_access_key_id),
                ("S3_SECRET_ACCESS_KEY", self.s3_secret_access_key),
                ("S3_BUCKET", self.s3_bucket),
            )
            if not value
        ]
        if missing:
            raise ValueError(
                f"STORAGE_BACKEND=s3 needs R2_ACCOUNT_ID (+ R2_*) or {', '.join(missing)} (+ S3_ENDPOINT_URL)"
            )
        assert self.s3_access_key_id and self.s3_secret_access_key and self.s3_bucket
        return S3Connection(
            endpoint_url=self.s3_endpoint_url or None,
            region=self.s3_region,
            access_key_id=self.s3_access_key_id,
            secret_access_key=self.s3_secret_access_key,
            bucket=self.s3_bucket,
        )
