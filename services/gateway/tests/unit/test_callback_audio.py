"""The completion callback decodes every sample at the door: audio that would not encode later is a 422."""
from __future__ import annotations

import base64
import struct
from datetime import UTC, datetime
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from timbre_common.audio import encode_wav
from timbre_common.callback_tokens import callback_token
from timbre_common.contracts.synthesis import JobOwner, LookupJob, SynthesisCompleted, SynthesisFailed
from timbre_common.testing import FakeBus
from timbre_gateway.http.app import create_app

SECRET = "callback-secret-for-tests"


def _float_wav(samples: list[float], sample_rate: int = 24000) -> bytes:
    data = struct.pack(f"<{len(samples)}f", *samples)
    fmt = struct.pack("<HHIIHH", 3, 1, sample_rate, sample_rate * 4, 4, 32)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE" + b"fmt "
            + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def _gateway() -> tuple[httpx.AsyncClient, FakeBus]:
    bus = FakeBus()

    async def owner(cmd: LookupJob, body: bytes | None) -> JobOwner:
        return JobOwner(job_id=cmd.job_id, account_id="acc-1", voice_id="v", backend="qwen3-0.6b",
                        status="pending", created_at=datetime(2026, 3, 1, tzinfo=UTC), attempt=1)

    bus.on(LookupJob, owner)
    settings = SimpleNamespace(modal_callback_secret=SecretStr(SECRET), admin_secret=SecretStr("admin"),
                               max_upload_bytes=1 << 20, max_json_body_bytes=1 << 20,
                               max_callback_body_bytes=1 << 24, max_webhook_body_bytes=1 << 20)
    ctx = SimpleNamespace(settings=settings, accounts=None, limiter=None, bus=bus)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://gw")
    return client, bus


async def _complete(wav: bytes) -> tuple[httpx.Response, FakeBus]:
    client, bus = _gateway()
    async with client:
        response = await client.post("/v1/jobs/j1/complete?attempt=1",
                                     headers={"authorization": f"Bearer {callback_token(SECRET, 'j1', 1)}"},
                                     json={"job_id": "j1", "wav_b64": base64.b64encode(wav).decode()})
    return response, bus


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
async def test_a_callback_with_samples_that_do_not_decode_is_refused(bad: float) -> None:
    response, bus = await _complete(_float_wav([0.0, 0.5, bad, 0.1]))
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_audio"
    assert bus.published == []  # nothing stored, so no later download can answer 500


async def test_a_callback_with_no_samples_is_refused() -> None:
    wav = encode_wav(np.zeros(2400, dtype=np.float32), 24000)
    response, bus = await _complete(wav[:44])
    assert response.status_code == 422 and bus.published == []


async def test_good_audio_is_accepted_and_its_length_measured_from_the_samples() -> None:
    response, bus = await _complete(encode_wav(np.zeros(12000, dtype=np.float32), 24000))
    assert response.status_code == 200 and response.json()["status"] == "accepted"
    [completed] = bus.events(SynthesisCompleted)
    assert completed.audio_seconds == 0.5 and completed.sample_rate == 24000
    assert bus.events(SynthesisFailed) == []


