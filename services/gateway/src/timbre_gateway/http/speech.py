"""Streamed synthesis, shared by `POST /v1/synthesize` with `stream: true` and `POST /v1/audio/speech`.

A cache hit streams the stored audio. A miss opens a stream on this instance's relay, submits the job with
the stream as its target, waits for the first piece (a failure before any audio is still a proper error
status), then answers 200 and relays the rest as it comes. The job is an ordinary job throughout: its whole
audio lands in storage and the cache, whether or not the client stays to the end.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import Response

from timbre_common.contracts.synthesis import GetJob, JobView

from ..adapters.stream_relay import StreamBroken
from .errors import ApiError
from .schemas import SynthesizeRequest
from .streaming import audio_stream_response, open_stream, stored_pieces

# The status of a stream that fails before its first piece.
_FIRST_PIECE_STATUS = {"stream_timeout": 504, "worker_lost": 502, "stream_gap": 502}
# Worker failures that are the request's own (nothing another attempt would change): 422.
_REQUEST_FAILURES = frozenset({"unsupported_language", "empty_text", "unknown_voice", "missing_voice",
                               "invalid_reference", "reference_missing"})


async def streamed_synthesis(ctx: Any, caller: Any, body: SynthesizeRequest, *, speed: float = 1.0,
                             out_rate: int | None = None, sse: bool = False,
                             on_done: Callable[[float], dict[str, Any]] | None = None) -> Response:
    """Answer `body` with its audio as a stream (see the module's docstring)."""
    from .routes import submit_synthesis  # routes imports this module lazily too

    stream = ctx.streams.open()
    try:
        accepted, audio, headers = await submit_synthesis(ctx, caller, body, stream=stream)
    except BaseException:
        stream.close()
        raise
    headers["X-Job-Id"] = accepted.job_id or ""
    headers.pop("Location", None)
    fmt = body.response_format
    if accepted.cache_hit:
        stream.close()
        # A streamed request's hit comes back as the WAV, to be cut into pieces and encoded as they go.
        rate, pieces = await asyncio.to_thread(stored_pieces, audio or b"", speed)
        words = None
        if sse and body.timestamps:
            view, _ = await ctx.bus.call("dispatcher", GetJob(account_id=caller.account_id,
                                                              job_id=accepted.job_id or ""), expect=JobView)
            words = view.words
        return audio_stream_response(fmt, headers, sample_rate=rate, stored=pieces, speed=1.0, stretched=speed,
                                     out_rate=out_rate, sse=sse, on_done=on_done, timestamps=body.timestamps,
                                     words=words)
    if accepted.status == "failed":
        stream.close()
        raise ApiError(500, "synthesis_failed", "the job could not be started",
                       details={"job_id": accepted.job_id})
    try:
        first = await open_stream(stream)
    except StreamBroken as exc:
        raise ApiError(_FIRST_PIECE_STATUS.get(exc.code, 422 if exc.code in _REQUEST_FAILURES else 500),
                       exc.code, exc.message, details={"job_id": accepted.job_id}) from None
    return audio_stream_response(fmt, headers, stream=stream, sample_rate=first.sample_rate, speed=speed,
                                 out_rate=out_rate, sse=sse, on_done=on_done, timestamps=body.timestamps)
