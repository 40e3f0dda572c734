"""A read-only reader of the bucket storage writes to: stored audio answered without crossing the broker.

Storage stays the only writer. `fs` reads the file under STORAGE_ROOT (and the content type beside it); `s3`
sends a GetObject with the storage service's own connection settings. A missing object is None: the caller
then asks storage as before.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import mimetypes
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

# Formats storage keeps beside a generated WAV, with the same stem (storage's rendition_key).
RENDITION_FORMATS = ("mp3", "opus", "flac", "pcm")


def rendition_key(source_key: str, fmt: str) -> str | None:
    """Where storage keeps `fmt` of a generated WAV; None for a format it does not keep that way."""
    if fmt == "wav":
        return source_key
    if fmt not in RENDITION_FORMATS or not source_key.endswith(".wav"):
        return None
    return f"{source_key[: -len('.wav')]}.{fmt}"


class BucketReader(Protocol):
    async def read(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, content type) of an object, or None when it is not there."""

    async def presign(self, key: str, expires_in: int) -> str | None:
        """A download URL as storage would sign it, when the object is there; None: ask storage."""

    async def close(self) -> None: ...


class FsBucketReader:
    _META = ".ct"  # storage's sidecar with the content type

    def __init__(self, root: Path, *, public_base_url: str = "", signing_key: bytes = b"") -> None:
        self.root = Path(root).resolve()
        self.public_base_url = public_base_url.rstrip("/")
        self._signing_key = signing_key

    def _path(self, key: str) -> Path | None:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root or any(p.startswith(".") for p in Path(key).parts):
            return None
        return path

    async def presign(self, key: str, expires_in: int) -> str | None:
        """storage's own URL form (/blobs/{key}?expires=&signature=, HMAC-SHA256 with STORAGE_SIGNING_KEY)."""
        path = self._path(key)
        if not self._signing_key or not self.public_base_url or path is None or not path.is_file():
            return None
        expires = int(time.time()) + expires_in
        signature = hmac.new(self._signing_key, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()
        return f"{self.public_base_url}/blobs/{quote(key, safe='/')}?expires={expires}&signature={signature}"

    def _read(self, key: str) -> tuple[bytes, str] | None:
        path = self._path(key)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        try:
            content_type = path.with_name(f".{path.name}{self._META}").read_text().strip()
        except FileNotFoundError:
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return data, content_type

    async def read(self, key: str) -> tuple[bytes, str] | None:
        # A cached answer is ~100 KB: a read from the page cache costs less than a hop to a thread.
        return self._read(key) if not key.endswith((".mp3", ".opus", ".flac")) else await asyncio.to_thread(
            self._read, key)

    async def close(self) -> None:
        return None


class S3BucketReader:
    """GetObject through one long-lived aioboto3 client, opened on first use."""

    def __init__(self, *, bucket: str, endpoint_url: str | None, region: str, access_key_id: str,
                 secret_access_key: str) -> None:
        self.bucket, self.endpoint_url, self.region = bucket, endpoint_url, region
        self._access_key_id, self._secret = access_key_id, secret_access_key
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"S3BucketReader(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    async def _open(self) -> Any:
        async with self._lock:
            if self._client is None:
                import aioboto3
                from botocore.config import Config

                stack = AsyncExitStack()
                self._client = await stack.enter_async_context(aioboto3.Session().client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region,
                    aws_access_key_id=self._access_key_id, aws_secret_access_key=self._secret,
                    config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                  retries={"max_attempts": 2, "mode": "standard"},
                                  request_checksum_calculation="when_required",
                                  response_checksum_validation="when_required")))
                self._stack = stack
        return self._client

    async def read(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        client = self._client or await self._open()
        try:
            response = await client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as stream:
                data = await stream.read()
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or str(exc.response.get("Error", {}).get("Code")) in {"NoSuchKey", "404", "NotFound"}:
                return None
            raise
        return data, response.get("ContentType") or "application/octet-stream"

    async def presign(self, key: str, expires_in: int) -> str | None:
        from botocore.exceptions import ClientError

        client = self._client or await self._open()
        try:
            await client.head_object(Bucket=self.bucket, Key=key)
        except ClientError:
            return None
        return await client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                   ExpiresIn=expires_in)

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack, self._client = None, None
