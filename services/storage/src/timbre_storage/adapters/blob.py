"""Bucket backends: a local directory (fs) and any S3-compatible service (s3: R2, MinIO, AWS)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import mimetypes
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

from pydantic import SecretStr

from timbre_storage.domain import InvalidId, ObjectMissing, StorageError, check_key
from timbre_storage.settings import S3Connection, StorageSettings

__all__ = [
    "BlobStore",
    "FsBlobStore",
    "ObjectMissing",
    "S3BlobStore",
    "SignatureInvalid",
    "UrlExpired",
    "build_blob_store",
]

MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's own ceiling; the fs backend follows it.


class SignatureInvalid(StorageError):
    """A presigned URL whose key, expiry or signature was changed."""


class UrlExpired(StorageError):
    """A correctly signed URL past its expiry."""


@runtime_checkable
class BlobStore(Protocol):
    """The bucket: the only place object bytes live."""

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write (or overwrite) one object atomically."""
        ...

    async def get(self, key: str) -> bytes:
        """Read one object; raises ObjectMissing."""
        ...

    async def exists(self, key: str) -> bool:
        """True when the object is in the bucket."""
        ...

    async def delete(self, key: str) -> None:
        """Delete one object; a missing object is not an error."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with prefix; returns how many went."""
        ...

    async def presign_get(self, key: str, expires_in: int = 3600) -> str:
        """A time-limited URL that downloads the object without credentials."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def _check_expires_in(expires_in: int) -> int:
    if not 1 <= expires_in <= MAX_PRESIGN_SECONDS:
        raise ValueError(f"expires_in must be within 1..{MAX_PRESIGN_SECONDS} seconds")
    return expires_in


class FsBlobStore:
    """Objects as files under root; URLs signed with HMAC-SHA256 and served by the storage HTTP app."""

    _META = ".ct"  # sidecar with the content type; hidden names are never valid keys

    def __init__(
        self,
        root: Path,
        public_base_url: str,
        signing_key: bytes,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not signing_key:
            raise ValueError("signing_key must not be empty")
        self.root = Path(root).resolve()
        self.public_base_url = public_base_url.rstrip("/")
        self._signing_key = signing_key
        self._clock = clock

    def __repr__(self) -> str:
        return f"FsBlobStore(root={str(self.root)!r}, public_base_url={self.public_base_url!r})"

    def _path(self, key: str) -> Path:
        check_key(key)
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise InvalidId(f"invalid key: {key!r}")
        return path

    def _meta_path(self, path: Path) -> Path:
        return path.with_name(f".{path.name}{self._META}")

    def _write(self, path: Path, data: bytes, content_type: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Sidecar first, then the data: a reader never sees data without its type.
        for target, payload in ((self._meta_path(path), content_type.encode()), (path, data)):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write via temp file + rename so readers see the old or the new object, never half."""
        await asyncio.to_thread(self._write, self._path(key), data, content_type)

    def _read(self, path: Path, key: str) -> bytes:
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectMissing(key) from None

    async def get(self, key: str) -> bytes:
        """Read one object; raises ObjectMissing."""
        return await asyncio.to_thread(self._read, self._path(key), key)

    async def content_type(self, key: str) -> str:
        """The content type given at put time (guessed from the extension if the sidecar is gone)."""
        path = self._path(key)
        try:
            return (await asyncio.to_thread(self._meta_path(path).read_text)).strip()
        except OSError:
            return mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    async def exists(self, key: str) -> bool:
        """True when the object is a file under root."""
        return await asyncio.to_thread(self._path(key).is_file)

    def _unlink(self, path: Path) -> bool:
        self._meta_path(path).unlink(missing_ok=True)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False
        self._prune(path.parent)
        return True

    def _prune(self, directory: Path) -> None:
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    async def delete(self, key: str) -> None:
        """Delete one object and its empty parent folders."""
        await asyncio.to_thread(self._unlink, self._path(key))

    def _delete_prefix(self, prefix: str) -> int:
        # The part before the last "/" is a folder; the rest matches names like an S3 prefix.
        folder = prefix.rpartition("/")[0]
        if folder:
            check_key(folder)
        base = (self.root / folder).resolve() if folder else self.root
        if not base.is_relative_to(self.root) or not base.is_dir():
            return 0
        deleted = 0
        for dirpath, _dirnames, filenames in os.walk(base, topdown=False):
            for name in filenames:
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and self._unlink(path):
                    deleted += 1
        return deleted

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with prefix."""
        if not prefix:
            raise ValueError("refusing to delete an empty prefix (the whole bucket)")
        return await asyncio.to_thread(self._delete_prefix, prefix)

    def now(self) -> float:
        """The store's clock (unix seconds)."""
        return self._clock()

    def signature(self, key: str, expires: int) -> str:
        """Hex HMAC-SHA256 over the key and the expiry (unix seconds)."""
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    async def presign_get(self, key: str, expires_in: int = 3600) -> str:
        """URL of the storage HTTP app: /blobs/{key}?expires=...&signature=..."""
        check_key(key)
        expires = int(self._clock()) + _check_expires_in(expires_in)
        return (
            f"{self.public_base_url}/blobs/{quote(key, safe='/')}"
            f"?expires={expires}&signature={self.signature(key, expires)}"
        )

    def verify(self, key: str, expires: str | None, signature: str | None) -> None:
        """Raise SignatureInvalid for a changed URL, UrlExpired for a stale one."""
        if not expires or not signature or not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
            raise SignatureInvalid("missing or malformed signature")
        if not hmac.compare_digest(self.signature(key, int(expires)).encode(), signature.encode()):
            raise SignatureInvalid("signature does not match")
        if int(expires) <= self._clock():
            raise UrlExpired("URL expired")

    async def close(self) -> None:
        """Nothing to release."""


class S3BlobStore:
    """Any S3-compatible bucket through one long-lived aioboto3 client."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None,
        region: str,
        access_key_id: str,
        secret_access_key: SecretStr | str,
        addressing_style: str = "path",
        page_size: int = 1000,
        delete_batch: int = 1000,
    ) -> None:
        if not 1 <= delete_batch <= 1000:
            raise ValueError("delete_batch must be within 1..1000 (DeleteObjects limit)")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self._access_key_id = access_key_id
        self._secret = secret_access_key if isinstance(secret_access_key, SecretStr) else SecretStr(secret_access_key)
        self._addressing_style = addressing_style
        self._page_size = page_size
        self._delete_batch = delete_batch
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    @classmethod
    def from_connection(cls, conn: S3Connection, **kwargs: Any) -> S3BlobStore:
        """Store for an S3Connection (R2 or any S3 endpoint)."""
        return cls(
            bucket=conn.bucket,
            endpoint_url=conn.endpoint_url,
            region=conn.region,
            access_key_id=conn.access_key_id,
            secret_access_key=conn.secret_access_key,
            **kwargs,
        )

    @classmethod
    def from_settings(cls, settings: StorageSettings, **kwargs: Any) -> S3BlobStore:
        """R2 when R2_ACCOUNT_ID is set (endpoint https://{id}.r2.cloudflarestorage.com, region auto), else S3_*."""
        return cls.from_connection(settings.s3_connection(), **kwargs)

    async def open(self) -> S3BlobStore:
        """Create the one client this store uses until close()."""
        if self._client is not None:
            return self
        import aioboto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": self._addressing_style},
            retries={"max_attempts": 5, "mode": "standard"},
            # Third-party S3 services (older R2, MinIO) reject the CRC32 headers newer botocore adds.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = aioboto3.Session()
        stack = AsyncExitStack()
        self._client = await stack.enter_async_context(
            session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self._access_key_id,
                aws_secret_access_key=self._secret.get_secret_value(),
                config=config,
            )
        )
        self._stack = stack
        return self

    async def __aenter__(self) -> S3BlobStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def client(self) -> Any:
        """The open aiobotocore client."""
        if self._client is None:
            raise RuntimeError("S3BlobStore is not open: await store.open() first")
        return self._client

    @staticmethod
    def _is_missing(exc: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(exc, ClientError):
            return False
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in {"NoSuchKey", "404", "NotFound"} or status == 404

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """PutObject (atomic on S3: readers see the old or the new object)."""
        await self.client.put_object(Bucket=self.bucket, Key=check_key(key), Body=data, ContentType=content_type)

    async def get(self, key: str) -> bytes:
        """GetObject; raises ObjectMissing."""
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=check_key(key))
        except Exception as exc:
            if self._is_missing(exc):
                raise ObjectMissing(key) from None
            raise
        async with response["Body"] as body:
            return await body.read()

    async def exists(self, key: str) -> bool:
        """HeadObject."""
        try:
            await self.client.head_object(Bucket=self.bucket, Key=check_key(key))
        except Exception as exc:
            if self._is_missing(exc):
                return False
            raise
        return True

    async def delete(self, key: str) -> None:
        """DeleteObject (S3 treats a missing key as success)."""
        await self.client.delete_object(Bucket=self.bucket, Key=check_key(key))

    async def delete_prefix(self, prefix: str) -> int:
        """ListObjectsV2 pages + DeleteObjects batches of at most 1000 keys."""
        if not prefix:
            raise ValueError("refusing to delete an empty prefix (the whole bucket)")
        paginator = self.client.get_paginator("list_objects_v2")
        pending: list[str] = []
        deleted = 0
        # Listing continues after the last key seen, so deleting behind it skips nothing.
        async for page in paginator.paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": self._page_size}
        ):
            pending.extend(item["Key"] for item in page.get("Contents", []))
            while len(pending) >= self._delete_batch:
                deleted += await self._delete_batch_of(pending[: self._delete_batch], prefix)
                del pending[: self._delete_batch]
        if pending:
            deleted += await self._delete_batch_of(pending, prefix)
        return deleted

    async def _delete_batch_of(self, keys: list[str], prefix: str) -> int:
        response = await self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
        )
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(
                f"DeleteObjects failed for {len(errors)} keys under {prefix!r}: "
                f"{first.get('Code')} {first.get('Message')} ({first.get('Key')})"
            )
        return len(keys)

    async def presign_get(self, key: str, expires_in: int = 3600) -> str:
        """SigV4 query-signed GET URL, valid 1 h by default (7 days at most)."""
        return await self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": check_key(key)},
            ExpiresIn=_check_expires_in(expires_in),
        )

    async def close(self) -> None:
        """Close the client's connection pool."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


async def build_blob_store(settings: StorageSettings) -> BlobStore:
    """The backend STORAGE_BACKEND names (fs | s3), opened and ready."""
    if settings.storage_backend == "fs":
        return FsBlobStore(settings.storage_root, settings.storage_public_url, settings.signing_key_bytes())
    if settings.storage_backend == "s3":
        return await S3BlobStore.from_settings(settings).open()
    raise ValueError(f"unknown STORAGE_BACKEND {settings.storage_backend!r}")
