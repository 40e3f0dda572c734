"""The official `openai` SDK, unchanged except base_url and api_key, against the running platform."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import openai
import pytest

from timbre_common.catalogue import SYSTEM_VOICES

pytestmark = pytest.mark.e2e
HEART = next(v for v in SYSTEM_VOICES if v.name == "heart")
JOE = next(v for v in SYSTEM_VOICES if v.name == "joe")
TEXT = "Today is a wonderful day to build something people love. It starts with a single sentence."


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data)) as container:
        rate = container.streams.audio[0].rate
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
    return np.concatenate(frames).astype(np.float32), rate


def _loud(samples: np.ndarray) -> bool:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) > 0.01


@pytest.fixture(scope="module")
def sdk(client):  # type: ignore[no-untyped-def]
    key = client.new_key()
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=key["api_key"]), key


def test_speech_create_with_the_sdk_decodes_as_mp3(sdk):
    oai, _ = sdk
    audio = oai.audio.speech.create(model="tts-1", voice="alloy", input=TEXT)
    samples, rate = _decode(audio.content)
    assert rate == 24000 and samples.size / rate > 2.0 and _loud(samples)
    assert audio.response.headers["X-Voice-Id"] == HEART.voice_id
    assert audio.response.headers["X-Cache"] == "MISS" and audio.response.headers["X-Job-Id"]


def test_streaming_response_iter_bytes_in_every_format(sdk):
    oai, _ = sdk
    for fmt in ("wav", "opus", "flac", "pcm"):
        with oai.audio.speech.with_streaming_response.create(model="tts-1", voice="onyx", input=TEXT,
                                                             response_format=fmt) as response:
            assert response.headers["X-Voice-Id"] == JOE.voice_id
            data = b"".join(response.iter_bytes())
        if fmt == "pcm":  # OpenAI's pcm: 24 kHz 16-bit mono, whatever the voice's own rate (joe: 22.05 kHz)
            samples, rate = np.frombuffer(data, "<i2").astype(np.float32) / 32768, 24000
            assert response.headers["content-type"].startswith("audio/pcm; rate=24000")
        else:
            samples, rate = _decode(data)
        assert samples.size / rate > 2.0 and _loud(samples), fmt


def test_voices_by_system_name_by_id_and_speed_stretches_time_not_pitch(sdk):
    oai, _ = sdk
    normal = oai.audio.speech.create(model="tts-1", voice="heart", input=TEXT, response_format="pcm")
    by_id = oai.audio.speech.create(model="embedded", voice={"id": HEART.voice_id}, input=TEXT,
                                    response_format="pcm")
    assert by_id.response.headers["X-Cache"] == "HIT" and by_id.content == normal.content
    fast = oai.audio.speech.create(model="tts-1", voice="heart", input=TEXT, response_format="pcm", speed=2.0,
                                   instructions="Speak cheerfully.")
    a = np.frombuffer(normal.content, "<i2").astype(np.float32) / 32768
    b = np.frombuffer(fast.content, "<i2").astype(np.float32) / 32768
    assert b.size == pytest.approx(a.size / 2, rel=0.05)
    # Same pitch: the strongest spectral peak of voiced speech stays where it was.
    def peak_hz(x: np.ndarray) -> float:
        spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
        freqs = np.fft.rfftfreq(x.size, 1 / 24000)
        band = (freqs > 80) & (freqs < 400)
        return float(freqs[band][np.argmax(spectrum[band])])
    assert peak_hz(b) == pytest.approx(peak_hz(a), rel=0.1)


def test_sse_stream_format_sends_deltas_then_done_with_usage(sdk, client):
    _, key = sdk
    body = {"model": "gpt-4o-mini-tts", "voice": "nova", "input": TEXT, "response_format": "pcm",
            "stream_format": "sse"}
    with client.http.stream("POST", "/v1/audio/speech", json=body, headers=client.auth(key)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert deltas and events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["input_tokens"] == len(TEXT)
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert _loud(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768)


def test_errors_raise_the_sdks_usual_exceptions(sdk, client):
    oai, _ = sdk
    with pytest.raises(openai.BadRequestError) as exc:
        oai.audio.speech.create(model="tts-1", voice="nobody-by-this-name", input=TEXT)
    assert exc.value.code == "voice_not_found" and exc.value.param == "voice"
    assert exc.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        oai.audio.speech.create(model="whisper-1", voice="alloy", input=TEXT)
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        oai.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, speed=9.0)
    assert exc.value.param == "speed"
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        oai.audio.speech.create(model="tts-1", voice="alloy", input="x" * 5001)
    assert exc.value.code == "text_too_long"
    bad = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="tb_not_a_real_key")
    with pytest.raises(openai.AuthenticationError):
        bad.audio.speech.create(model="tts-1", voice="alloy", input=TEXT)


def test_voices_and_models_lists(sdk, client):
    oai, key = sdk
    voices = client.http.get("/v1/audio/voices", headers=client.auth(key)).json()["voices"]
    by_name = {v["name"]: v for v in voices}
    assert by_name["joe"]["id"] == JOE.voice_id and by_name["alloy"]["alias_of"] == "heart"
    ids = [m.id for m in oai.models.list()]
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "embedded"} <= set(ids)
