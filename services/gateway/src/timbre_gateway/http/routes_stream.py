"""The chunk callback of remote GPU workers: pieces of a streamed job, forwarded to the gateway instance that
holds the client's connection (which may be another replica than the one the worker reached)."""
from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError

from timbre_common.contracts.synthesis import SynthesisChunk
from timbre_common.logging import get_logger

from .deps import CallbackAttemptDep, Ctx
from .errors import ApiError, error_responses
from .schemas import CallbackOutcome

log = get_logger(__name__)
router = APIRouter(prefix="/v1")


class ChunkCallback(BaseModel):
    job_id: str
    stream_to: str = Field(max_length=300)
    stream_id: str = Field(max_length=100)
    attempt: int = Field(default=1, ge=1)
    seq: int = Field(ge=0)
    final: bool = False
    total: int | None = Field(default=None, ge=1)
    sample_rate: int = Field(default=0, ge=0, le=192_000)
    pcm_b64: str = ""
    error_code: str | None = Field(default=None, max_length=100)
    error: str | None = Field(default=None, max_length=2000)


@router.post("/jobs/{job_id}/chunks", response_model=CallbackOutcome, tags=["internal"],
             summary="Audio pieces of a streamed job from remote GPU workers (bearer: the job attempt's token)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": ChunkCallback.model_json_schema()}}}},
             responses=error_responses(400, 401, 413, 422, codes={
                 400: ["invalid_body", "job_id_mismatch", "attempt_mismatch"], 401: ["invalid_callback_token"],
                 413: ["payload_too_large"], 422: ["invalid_request", "invalid_stream", "invalid_audio"]}))
async def job_chunk(request: Request, ctx: Ctx, attempt: CallbackAttemptDep, job_id: str) -> CallbackOutcome:
    # Read by hand, so the token (a dependency, good for this job and attempt only) is checked before the body
    # is parsed.
    try:
        body = ChunkCallback.model_validate_json(await request.body())
    except ValidationError as exc:
        raise ApiError(400, "invalid_body", f"not a chunk callback: {exc.error_count()} problem(s)") from None
    if body.job_id != job_id:
        raise ApiError(400, "job_id_mismatch", "job_id in the body differs from the path")
    if body.attempt != attempt:
        raise ApiError(400, "attempt_mismatch", "attempt in the body differs from the token's")
    # Only a gateway stream queue of this deployment can be named: the callback cannot reach other queues.
    if not body.stream_to.startswith(ctx.bus.names.stream_queue("")):
        raise ApiError(422, "invalid_stream", "stream_to is not a stream queue of this deployment")
    try:
        pcm = base64.b64decode(body.pcm_b64, validate=True)
    except binascii.Error:
        raise ApiError(422, "invalid_audio", "pcm_b64 is not base64") from None
    if len(pcm) % 2:
        raise ApiError(422, "invalid_audio", "pcm_b64 is not 16-bit PCM")
    await ctx.bus.send(body.stream_to, SynthesisChunk(
        job_id=job_id, stream_id=body.stream_id, attempt=body.attempt, seq=body.seq, final=body.final,
        sample_rate=body.sample_rate, total=body.total, error_code=body.error_code, error=body.error), body=pcm)
    return CallbackOutcome(status="accepted")
