"""Voice registrations reach the worker through one queue per backend; each worker profiles only its own."""
from __future__ import annotations

from collections.abc import Sequence

import httpx
import numpy as np
import pytest

from timbre_common.contracts.voices import VoiceProfiled, VoiceRegistered
from timbre_common.testing import FakeBus, envelope
from timbre_gpu_worker import handlers
from timbre_gpu_worker.backends.base import BackendError, SynthesisRequest, SynthesisResult
from timbre_gpu_worker.engine import Engine


class ToneBackend:
    """Half a second of tone per request; records what it was asked."""

    name = "tone"
    languages = frozenset({"en"})

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.profiled: list[str] = []

    def available(self) -> bool:
        return True

    def load(self) -> None:
        pass

    def profile_voice(self, voice_id: str, reference_wav: bytes, ref_text: str | None) -> dict:
        self.profiled.append(voice_id)
        return {"backend": "tone", "bytes": len(reference_wav)}

    def synthesize_batch(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult | BackendError]:
        self.batches.append(len(requests))
        tone = (0.3 * np.sin(np.arange(12000) / 12000 * 2 * np.pi * 220)).astype(np.float32)
        return [SynthesisResult(tone, 24000, details={"prompt_cached": True}) for _ in requests]


@pytest.fixture
async def http():
    async def serve(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"RIFFfake") if request.url.path == "/ref.wav" else httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(serve)) as client:
        yield client


async def test_voice_registration_is_profiled_only_by_a_worker_serving_its_backend(http):
    bus, backend = FakeBus(), ToneBackend()
    engine = Engine({"tone": backend})
    for voice, name in (("v-other", "qwen3-0.6b"), ("v-tone", "tone")):
        event = VoiceRegistered(voice_id=voice, account_id="a1", backend=name, lang="en", reference_key="k",
                                reference_url="http://store/ref.wav")
        await handlers.on_voice_registered(event, envelope=envelope(), engine=engine, bus=bus, http=http,
                                           max_reference_bytes=1000)
    assert backend.profiled == ["v-tone"]
    [profiled] = bus.events(VoiceProfiled)
    assert profiled.voice_id == "v-tone" and profiled.profile == {"backend": "tone", "bytes": 8}
    await engine.close()


def test_each_backend_has_its_own_profile_queue_bound_to_its_own_registrations_only():
    from timbre_common.catalogue import KNOWN_BACKENDS
    from timbre_common.messaging import QUEUES, voice_profile_queue, voice_profile_routing_key

    specs = [voice_profile_queue(b) for b in KNOWN_BACKENDS]
    assert len({s.name for s in specs}) == len(KNOWN_BACKENDS)
    assert [s.bindings for s in specs] == [(voice_profile_routing_key(b),) for b in KNOWN_BACKENDS]
    # Declared by the workers of each backend, not by every service: a backend served elsewhere (Modal)
    # gets no queue that would fill up unread.
    assert not any(s.name in QUEUES for s in specs)

