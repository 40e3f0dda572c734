"""The OpenAI-compatible speech surface: `POST /v1/audio/speech`, `GET /v1/audio/voices`, `GET /v1/models`.

Same API keys, limits, quotas and usage as the rest of the API; every answer streams (like OpenAI's); errors
on these routes take OpenAI's shape `{"error": {"message", "type", "param", "code"}}` so the official SDKs
raise their usual exceptions.

Models: `tts-1` is the voice's own backend; `tts-1-hd` and `gpt-4o-mini-tts` ask for the Qwen3 backends
(`qwen3-1.7b`, `qwen3-0.6b`) for a custom voice when that backend runs on this deployment, and fall back
to the voice's own backend otherwise (system voices are the embedded backend's); a backend name
(`embedded`, `qwen3-1.7b`, `qwen3-0.6b`) asks for that backend. Voices: a voice id or a voice name of the
caller's (system voices included), or one of OpenAI's built-in names, each spoken by the system voice
nearest to it in register.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from timbre_common.catalogue import KNOWN_BACKENDS, SYSTEM_VOICES
from timbre_common.contracts.voices import ListVoices, VoiceList
from timbre_common.ids import is_canonical_uuid
from timbre_common.messaging import RemoteError, RpcTimeout

from .deps import CallerDep, Ctx
from .errors import _HTTP_CODES, ApiError, _validation_error, error_response
from .schemas import SynthesizeRequest, Text
from .speech import streamed_synthesis

# OpenAI's built-in voices, by the register of the system voice that speaks them.
OPENAI_VOICES: dict[str, str] = {
    **dict.fromkeys(("ash", "echo", "fable", "onyx", "verse", "cedar"), "joe"),
    **dict.fromkeys(("alloy", "ballad", "coral", "nova", "sage", "shimmer", "marin"), "heart"),
}
# OpenAI model -> the backend it prefers for a custom voice, when that backend runs here.
OPENAI_MODELS: dict[str, str | None] = {"tts-1": None, "tts-1-hd": "qwen3-1.7b", "gpt-4o-mini-tts": "qwen3-0.6b"}
# OpenAI's pcm is 24 kHz 16-bit mono, whatever the voice's own rate.
OPENAI_PCM_RATE = 24000
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
                403: "permission_error", 404: "invalid_request_error", 409: "invalid_request_error",
                413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}
_CREATED = 1_767_225_600  # 2026-01-01: models are not versioned by date here


def openai_error(response: JSONResponse) -> JSONResponse:
    """Our error body, reshaped the way OpenAI's clients read it."""
    ours = json.loads(bytes(response.body))["error"]
    fields = (ours.get("details") or {}).get("fields") or []
    param = fields[0] if fields and isinstance(fields[0], str) else (fields[0].get("field") if fields else None)
    status = response.status_code
    body = {"error": {"message": ours["message"], "type": _ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": ours["code"]}}
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
    return JSONResponse(body, status_code=status, headers=headers)


class OpenAIRoute(APIRoute):
    """Errors raised anywhere in the route (authentication, limits, body validation, the handler) answer in
    OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return openai_error(error_response(exc.status, exc.code, exc.message, headers=exc.headers,
                                                   details=exc.details))
            except RequestValidationError as exc:
                return openai_error(_validation_error(exc))
            except RemoteError as exc:
                return openai_error(error_response(exc.status if 400 <= exc.status < 600 else 502, exc.code,
                                                   exc.message))
            except RpcTimeout:
                return openai_error(error_response(503, "service_unavailable", "a backing service did not answer "
                                                   "in time; retry shortly", headers={"Retry-After": "5"}))
            except StarletteHTTPException as exc:  # e.g. a body that cannot be parsed at all
                code = _HTTP_CODES.get(exc.status_code, "error")
                return openai_error(error_response(exc.status_code, code,
                                                   exc.detail if isinstance(exc.detail, str) else code,
                                                   headers=getattr(exc, "headers", None)))

        return route


router = APIRouter(prefix="/v1", route_class=OpenAIRoute, tags=["openai"])


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class OpenAIErrorBody(BaseModel):
    """The body of every error on the OpenAI-compatible routes."""

    error: OpenAIErrorDetail


def openai_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these error statuses, in OpenAI's error shape."""
    return {s: {"model": OpenAIErrorBody,
                "description": f"Error in OpenAI's shape ({_ERROR_TYPES.get(s, 'server_error')})"} for s in statuses}


class VoiceRef(BaseModel):
    id: Text = Field(max_length=200)


class SpeechRequest(BaseModel):
    # Newer SDK fields this server does not know are ignored rather than refused, as OpenAI's own API does.
    model_config = ConfigDict(extra="ignore")
    model: Text = Field(max_length=100)
    input: Text
    voice: Annotated[Text, Field(max_length=200)] | VoiceRef
    instructions: Text | None = Field(default=None, max_length=4096,
                                      description="Accepted; no backend of this deployment takes instructions")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    # Not OpenAI's: word timestamps, as a `speech.audio.timestamps` event of the sse stream (English only).
    timestamps: bool = False


async def _voices(ctx: Any, account_id: str, *, pages: int = 10) -> list[Any]:
    """The caller's voices (system voices first), up to a few pages."""
    out, after = [], None
    for _ in range(pages):
        reply, _ = await ctx.bus.call("voices", ListVoices(account_id=account_id, limit=100, after=after),
                                      expect=VoiceList)
        out.extend(reply.voices)
        after = reply.next_after
        if after is None:
            break
    return out


async def _resolve_voice(ctx: Any, account_id: str, voice: str) -> Any:
    """A voice id or name of the caller's, or an OpenAI built-in name; 400 voice_not_found otherwise."""
    wanted = OPENAI_VOICES.get(voice.lower(), voice)
    voices = await _voices(ctx, account_id)
    if is_canonical_uuid(wanted):
        found = [v for v in voices if v.voice_id == wanted]
    else:
        found = [v for v in voices if v.name == wanted] or [v for v in voices if v.name.lower() == wanted.lower()]
    if not found:
        raise ApiError(400, "voice_not_found", f"no voice {voice!r}: use one of GET /v1/audio/voices",
                       details={"fields": ["voice"]})
    return found[0]


def _backend_for(ctx: Any, model: str, voice: Any) -> str:
    if model in KNOWN_BACKENDS:
        return model
    if model not in OPENAI_MODELS:
        raise ApiError(404, "model_not_found", f"model {model!r} does not exist here: use one of GET /v1/models",
                       details={"fields": ["model"]})
    preferred = OPENAI_MODELS[model]
    if preferred and voice.kind == "custom" and preferred in ctx.backends.available():
        return preferred
    return voice.backend


@router.post("/audio/speech", summary="OpenAI-compatible speech: the audio as it is made",
             response_class=Response,
             responses={200: {"content": {"audio/mpeg": {}, "audio/ogg": {}, "audio/flac": {}, "audio/wav": {},
                                          "audio/pcm": {}, "text/event-stream": {}},
                              "description": "The audio, streamed (or speech.audio.delta events with sse)"},
                        **openai_error_responses(400, 401, 402, 403, 404, 422, 429, 500, 502, 503, 504)})
async def speech(ctx: Ctx, caller: CallerDep, body: SpeechRequest) -> Response:
    if not body.input.strip():
        raise ApiError(400, "missing_field", "input is required", details={"fields": ["input"]})
    if body.response_format == "aac":
        raise ApiError(400, "unsupported_response_format", "aac is not available on this deployment; use mp3, "
                       "opus, flac, wav or pcm", details={"fields": ["response_format"]})
    voice = await _resolve_voice(ctx, caller.account_id, body.voice if isinstance(body.voice, str)
                                 else body.voice.id)
    backend = _backend_for(ctx, body.model, voice)
    request = SynthesizeRequest(voice_id=voice.voice_id, text=body.input, backend=backend,
                                response_format=body.response_format, stream=True,
                                timestamps=body.timestamps and body.stream_format == "sse")
    characters = len(body.input)

    def usage(seconds: float) -> dict[str, Any]:
        # Usage is billed in characters; OpenAI's token fields carry them so clients that sum usage keep working.
        return {"usage": {"input_tokens": characters, "output_tokens": 0, "total_tokens": characters,
                          "characters": characters, "audio_seconds": round(seconds, 3)}}

    return await streamed_synthesis(ctx, caller, request, speed=body.speed,
                                    out_rate=OPENAI_PCM_RATE if body.response_format == "pcm" else None,
                                    sse=body.stream_format == "sse", on_done=usage)


@router.get("/audio/voices", summary="The caller's voices, and OpenAI's built-in names, as speech clients list them",
            responses=openai_error_responses(401, 403, 429, 503))
async def audio_voices(ctx: Ctx, caller: CallerDep) -> dict[str, Any]:
    voices = await _voices(ctx, caller.account_id)
    listed = [{"id": v.voice_id, "voice_id": v.voice_id, "name": v.name, "kind": v.kind, "backend": v.backend,
               "lang": v.lang} for v in voices]
    system = {v.name: v.voice_id for v in SYSTEM_VOICES}
    aliases = [{"id": name, "voice_id": system[target], "name": name, "kind": "alias", "alias_of": target,
                "backend": "embedded", "lang": "en"} for name, target in OPENAI_VOICES.items() if target in system]
    return {"object": "list", "voices": listed + aliases}


@router.get("/models", summary="The speech models (OpenAI's names and the backends) this API accepts",
            responses=openai_error_responses(401, 403, 429, 503))
async def models(ctx: Ctx, caller: CallerDep) -> dict[str, Any]:
    available = set(ctx.backends.available())
    names = [*OPENAI_MODELS, *(b for b in KNOWN_BACKENDS if b in available)]
    return {"object": "list", "data": [{"id": n, "object": "model", "created": _CREATED, "owned_by": "timbre"}
                                       for n in names]}

