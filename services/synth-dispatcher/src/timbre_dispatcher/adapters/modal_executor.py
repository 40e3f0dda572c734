"""The `modal` executor: drains the work orders and spawns the Modal GPU function for each.

A work order is acknowledged only once its spawn is accepted, so a dispatcher that dies mid-way leaves
the order in the queue for the next one; a job spawned twice is harmless (the replay guard keeps the
first result), and one whose call is lost is re-sent by the deadline sweep.
"""
from __future__ import annotations

import asyncio
from typing import Any, Protocol

from timbre_common.callback_tokens import callback_token
from timbre_common.contracts import Envelope
from timbre_common.contracts.synthesis import SynthesisRequested
from timbre_common.logging import get_logger

log = get_logger(__name__)


class Spawner(Protocol):
    async def spawn(self, payload: dict[str, Any]) -> str:
        """Start the remote call; returns its id."""
        ...


class ModalSpawner:
    """Spawns `Synthesizer.synthesize` of the deployed Modal app (modal is imported only here)."""

    def __init__(self, app_name: str, class_name: str) -> None:
        self.app_name, self.class_name = app_name, class_name
        self._method: Any = None

    async def spawn(self, payload: dict[str, Any]) -> str:
        if self._method is None:
            import modal  # only deployments with EXECUTOR=modal install it

            cls = modal.Cls.from_name(self.app_name, self.class_name)
            self._method = cls().synthesize
        call = await self._method.spawn.aio(payload)
        return str(call.object_id)


class HttpSpawner:
    """Spawns by POSTing the payload to a URL that answers 2xx {"call_id": ...}: a stand-in for Modal in
    tests and a hook for other remote GPU hosts. Any other answer raises, so the work order is retried."""

    def __init__(self, url: str, *, timeout_s: float = 60.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    async def spawn(self, payload: dict[str, Any]) -> str:
        import httpx

        async with httpx.AsyncClient(timeout=self.timeout_s) as http:
            response = await http.post(self.url, json=payload)
        if response.status_code // 100 != 2:
            raise SpawnRefused(f"spawn refused: HTTP {response.status_code}")
        return str(response.json().get("call_id") or "")


class SpawnRefused(Exception):
    """The remote host did not accept the call; the work order is retried."""


def payload_for(order: SynthesisRequested, *, callback_url: str, callback_token: str,
                chunk_url: str | None = None) -> dict[str, Any]:
    """What the Modal function receives: the work order plus where to report and the token of this attempt (and,
    for a streamed job, where to post its pieces as they are made, with the same token)."""
    payload = {**order.model_dump(mode="json"), "callback_url": callback_url, "callback_token": callback_token}
    if chunk_url and order.stream_to:
        payload["chunk_url"] = chunk_url
    return payload


async def spawn_work_order(order: SynthesisRequested, *, envelope: Envelope, spawner: Spawner, jobs: Any,
                           public_base_url: str, callback_secret: str, spawn_timeout_s: float = 60.0) -> None:
    """Handler of the Modal executor's queue. The remote host gets a token for this job and attempt only; the
    callback secret never leaves the dispatcher and the gateway."""
    row = await jobs.get(order.job_id)
    if row is None or row["status"] != "pending":
        log.info("work_order_skipped", job_id=order.job_id, reason="job no longer pending")
        return
    if row.get("attempts") is not None and order.attempt < row["attempts"]:
        log.info("work_order_skipped", job_id=order.job_id, reason="superseded by a newer attempt",
                 attempt=order.attempt, current=row["attempts"])
        return
    base = public_base_url.rstrip("/")
    callback_url = f"{base}/v1/jobs/{order.job_id}/complete?attempt={order.attempt}"
    chunk_url = f"{base}/v1/jobs/{order.job_id}/chunks?attempt={order.attempt}"
    token = callback_token(callback_secret, order.job_id, order.attempt)
    # A spawn that hangs must not hold its work order (and a prefetch slot) forever: time out and retry.
    call_id = await asyncio.wait_for(
        spawner.spawn(payload_for(order, callback_url=callback_url, callback_token=token, chunk_url=chunk_url)),
        spawn_timeout_s)
    await jobs.set_executor_ref(order.job_id, call_id)
    log.info("modal_call_spawned", job_id=order.job_id, call_id=call_id, attempt=order.attempt)
