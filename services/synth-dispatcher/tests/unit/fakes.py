"""In-memory fakes of the dispatcher's repositories and of the storage service, for handler unit tests."""
from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from timbre_common.audio import transcode
from timbre_common.contracts.storage import GetObject, GetRendition, Presign, PresignedUrl, StoredObject
from timbre_common.messaging import RemoteError
from timbre_common.testing import FakeBus


class Clock:
    """A settable now(), shared by the fakes that compare against it."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FakeJobRepository:
    """Implements JobRepository's rules on dicts; every read returns a snapshot, as a database row is."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rows: dict[str, dict[str, Any]] = {}

    def _snap(self, row: dict[str, Any] | None) -> dict[str, Any] | None:
        return copy.deepcopy(row) if row is not None else None

    async def create(self, *, job_id: str, account_id: str, voice_id: str, text: str, lang: str, backend: str,
                     cache_key: str, response_format: str, request: dict[str, Any],
                     deadline_s: float, hold_id: str | None = None,
                     max_pending: int | None = None) -> dict[str, Any] | None:
        assert job_id not in self.rows
        pending = sum(1 for r in self.rows.values() if r["account_id"] == account_id and r["status"] == "pending")
        if max_pending is not None and pending >= max_pending:
            return None
        now = self.clock()
        self.rows[job_id] = {
            "job_id": job_id, "account_id": account_id, "voice_id": voice_id, "text": text, "lang": lang,
            "backend": backend, "cache_key": cache_key, "response_format": response_format,
            "status": "pending", "attempts": 1, "characters": len(text), "request": copy.deepcopy(request),
            "audio_key": None, "audio_expires_at": None, "error": None, "error_code": None,
            "synthesis_ms": None, "audio_seconds": None, "executor_ref": None, "created_at": now,
            "deadline_at": now + timedelta(seconds=deadline_s), "completed_at": None, "hold_id": hold_id,
        }
        return self._snap(self.rows[job_id])  # type: ignore[return-value]

    async def set_words(self, job_id: str, words: list[dict[str, Any]]) -> None:
        if job_id in self.rows:
            self.rows[job_id]["words"] = copy.deepcopy(words)

    async def has_words(self, job_id: str) -> bool:
        return self.rows.get(job_id, {}).get("words") is not None

    async def get(self, job_id: str, account_id: str | None = None) -> dict[str, Any] | None:
        row = self.rows.get(job_id)
        if row is None or (account_id is not None and row["account_id"] != account_id):
            return None
        return self._snap(row)

    async def pending_for(self, account_id: str, cache_key: str, response_format: str) -> dict[str, Any] | None:
        rows = [r for r in self.rows.values()
                if r["account_id"] == account_id and r["cache_key"] == cache_key and r["status"] == "pending"
                and r["response_format"] == response_format]
        return self._snap(min(rows, key=lambda r: r["created_at"])) if rows else None

    async def mark_ready(self, job_id: str, *, audio_key: str, expires_at: datetime | None,
                         synthesis_ms: int | None, audio_seconds: float | None) -> dict[str, Any] | None:
        row = self.rows.get(job_id)
        if row is None or row["status"] != "pending" or row["completed_at"] is not None:
            return None
        row.update(status="ready", audio_key=audio_key, audio_expires_at=expires_at,
                   synthesis_ms=synthesis_ms, audio_seconds=audio_seconds, completed_at=self.clock())
        return self._snap(row)

    async def mark_failed(self, job_id: str, *, code: str, reason: str,
                          from_status: tuple[str, ...] = ("pending",)) -> dict[str, Any] | None:
        row = self.rows.get(job_id)
        if row is None or row["status"] not in from_status:
            return None
        row.update(status="failed", error_code=code, error=reason,
                   completed_at=row["completed_at"] or self.clock())
        return self._snap(row)

    async def retry(self, job_id: str, *, deadline_s: float) -> dict[str, Any] | None:
        row = self.rows.get(job_id)
        if row is None or row["status"] != "pending":
            return None
        row.update(attempts=row["attempts"] + 1, deadline_at=self.clock() + timedelta(seconds=deadline_s))
        return self._snap(row)

    async def set_executor_ref(self, job_id: str, ref: str) -> None:
        self.rows[job_id]["executor_ref"] = ref

    async def overdue(self, limit: int = 100) -> list[dict[str, Any]]:
        now = self.clock()
        rows = sorted((r for r in self.rows.values() if r["status"] == "pending" and r["deadline_at"] < now),
                      key=lambda r: r["deadline_at"])[:limit]
        for row in rows:
            row["deadline_at"] = now + timedelta(seconds=30)
        return [self._snap(r) for r in rows]  # type: ignore[misc]

    async def fail_with_audio(self, audio_keys: list[str], *, code: str, reason: str) -> list[dict[str, Any]]:
        out = []
        for row in self.rows.values():
            if row["audio_key"] in audio_keys and row["status"] == "ready":
                row.update(status="failed", error_code=code, error=reason)
                out.append(self._snap(row))
        return out  # type: ignore[return-value]

    async def _delete(self, match: Any) -> list[dict[str, Any]]:
        gone = [self.rows.pop(job_id) for job_id in [j for j, r in self.rows.items() if match(r)]]
        return [{"job_id": r["job_id"], "audio_key": r["audio_key"]} for r in gone]

    async def delete_voice(self, account_id: str, voice_id: str) -> list[dict[str, Any]]:
        return await self._delete(lambda r: r["account_id"] == account_id and r["voice_id"] == voice_id)

    async def delete_account(self, account_id: str) -> list[dict[str, Any]]:
        return await self._delete(lambda r: r["account_id"] == account_id)

    async def delete_finished(self, *, older_than_s: float, limit: int = 500) -> list[dict[str, Any]]:
        cutoff = self.clock() - timedelta(seconds=older_than_s)
        gone = [self.rows.pop(j) for j in [j for j, r in self.rows.items() if r["status"] != "pending"
                                           and r["completed_at"] is not None and r["completed_at"] < cutoff][:limit]]
        return [{"job_id": r["job_id"], "account_id": r["account_id"], "audio_key": r["audio_key"]} for r in gone]


class FakeCacheIndex:
    """Implements CacheIndex: one entry per (account, cache key); expired entries are invisible."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.entries: dict[tuple[str, str], dict[str, Any]] = {}

    async def get(self, account_id: str, cache_key: str) -> dict[str, Any] | None:
        entry = self.entries.get((account_id, cache_key))
        if entry is None or (entry["expires_at"] is not None and entry["expires_at"] <= self.clock()):
            return None
        return dict(entry)

    async def put(self, *, account_id: str, cache_key: str, voice_id: str, job_id: str, audio_key: str,
                  expires_at: datetime | None, synthesis_ms: int | None) -> None:
        self.entries[(account_id, cache_key)] = {
            "account_id": account_id, "cache_key": cache_key, "voice_id": voice_id, "job_id": job_id,
            "audio_key": audio_key, "expires_at": expires_at, "synthesis_ms": synthesis_ms,
            "created_at": self.clock()}

    async def drop(self, account_id: str, cache_key: str) -> None:
        self.entries.pop((account_id, cache_key), None)

    async def _delete(self, match: Any) -> list[dict[str, Any]]:
        return [self.entries.pop(k) for k in [k for k, e in self.entries.items() if match(e)]]

    async def drop_audio(self, audio_keys: list[str]) -> int:
        return len(await self._delete(lambda e: e["audio_key"] in audio_keys))

    async def delete_voice(self, account_id: str, voice_id: str) -> list[str]:
        gone = await self._delete(lambda e: e["account_id"] == account_id and e["voice_id"] == voice_id)
        return [e["audio_key"] for e in gone]

    async def delete_account(self, account_id: str) -> int:
        return len(await self._delete(lambda e: e["account_id"] == account_id))

    async def drop_jobs(self, job_ids: list[str]) -> int:
        return len(await self._delete(lambda e: str(e["job_id"]) in job_ids))


class FakeStorage:
    """The storage service's answers to GetObject, GetRendition and Presign, over a dict of objects."""

    def __init__(self, bus: FakeBus, clock: Clock) -> None:
        self.clock = clock
        self.objects: dict[str, bytes] = {}
        self.expires_at: dict[str, datetime | None] = {}
        self.owners: dict[str, str | None] = {}
        self.encoded: list[tuple[str, str]] = []
        bus.on(GetObject, self._get)
        bus.on(GetRendition, self._rendition)
        bus.on(Presign, self._presign)

    def put(self, key: str, body: bytes, expires_at: datetime | None = None, *, owner: str | None = None) -> None:
        self.objects[key] = body
        self.expires_at[key] = expires_at
        if owner is not None:
            self.owners[key] = owner

    def _check_live(self, key: str) -> None:
        """As the real service: unknown → object_not_found; past its retention → object_expired."""
        if key not in self.objects:
            raise RemoteError("object_not_found", f"no object {key}", status=404)
        expires = self.expires_at.get(key)
        if expires is not None and expires <= self.clock():
            raise RemoteError("object_expired", f"object expired: {key}", status=404)

    def _check_owner(self, key: str, account_id: str | None) -> None:
        """As the real service: another account's object is object_not_found (objects put with an owner)."""
        if key in self.owners and self.owners[key] is not None and self.owners[key] != account_id:
            raise RemoteError("object_not_found", f"object not found: {key}", status=404)

    async def _get(self, cmd: GetObject, body: bytes | None) -> tuple[StoredObject, bytes]:
        self._check_owner(cmd.key, cmd.account_id)
        self._check_live(cmd.key)
        data = self.objects[cmd.key]
        return StoredObject(key=cmd.key, size=len(data), expires_at=self.expires_at[cmd.key]), data

    async def _rendition(self, cmd: GetRendition, body: bytes | None) -> tuple[StoredObject, bytes]:
        self._check_live(cmd.key)
        data = self.objects[cmd.key]
        if cmd.format == "wav":
            return StoredObject(key=cmd.key, size=len(data), expires_at=self.expires_at[cmd.key]), data
        self.encoded.append((cmd.key, cmd.format))
        encoded, content_type = transcode(data, cmd.format)
        return StoredObject(key=cmd.key, size=len(encoded), content_type=content_type,
                            expires_at=self.expires_at[cmd.key]), encoded

    async def _presign(self, cmd: Presign, body: bytes | None) -> PresignedUrl:
        self._check_owner(cmd.key, cmd.account_id)
        self._check_live(cmd.key)  # as the real service: no URL for an object that is not there
        return PresignedUrl(url=f"https://blobs.test/{cmd.key}?sig=x",
                            url_expires_at=self.clock() + timedelta(seconds=cmd.expires_in),
                            object_expires_at=self.expires_at.get(cmd.key))
