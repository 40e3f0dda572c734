"""The gateway's bucket reader, from the storage settings it shares with the storage service."""
from __future__ import annotations

from pathlib import Path

from ..settings import GatewaySettings
from .bucket import BucketReader, FsBucketReader, S3BucketReader

# Storage's development signing key (storage/settings.py), public by design and honoured on loopback only.
DEV_SIGNING_KEY = "timbre-dev-signing-key-do-not-use-outside-dev"


def bucket_reader(settings: GatewaySettings) -> BucketReader | None:
    """None when the bucket cannot be read from here (incomplete S3 settings): every read then asks storage."""
    if settings.storage_backend == "fs":
        key = settings.storage_signing_key.get_secret_value() if settings.storage_signing_key else ""
        if not key and settings.timbre_env.strip().lower() == "dev":
            key = DEV_SIGNING_KEY  # what storage signs with in development (loopback only)
        return FsBucketReader(Path(settings.storage_root), public_base_url=settings.storage_public_url,
                              signing_key=key.encode())
    if settings.r2_account_id:
        if not (settings.r2_access_key_id and settings.r2_secret_access_key and settings.r2_bucket_name):
            return None
        return S3BucketReader(bucket=settings.r2_bucket_name,
                              endpoint_url=f"https://{settings.r2_account_id.strip()}.r2.cloudflarestorage.com",
                              region="auto", access_key_id=settings.r2_access_key_id,
                              secret_access_key=settings.r2_secret_access_key.get_secret_value())
    if not (settings.s3_access_key_id and settings.s3_secret_access_key and settings.s3_bucket):
        return None
    return S3BucketReader(bucket=settings.s3_bucket, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                          access_key_id=settings.s3_access_key_id,
                          secret_access_key=settings.s3_secret_access_key.get_secret_value())
