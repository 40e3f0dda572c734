"""Per-job-attempt tokens of the remote GPU workers' completion callback.

The dispatcher signs each work order it hands to a remote host with HMAC(MODAL_CALLBACK_SECRET, job id and
attempt); the gateway recomputes it for the job in the callback's path and the attempt in its query. The secret
itself stays with those two services: a leaked token completes one attempt of one job, nothing else.
"""
from __future__ import annotations

import hashlib
import hmac

_LABEL = "timbre-callback-v1"


def callback_token(secret: str, job_id: str, attempt: int) -> str:
    """The token that lets a remote worker report attempt `attempt` of job `job_id`."""
    message = f"{_LABEL}\0{job_id}\0{int(attempt)}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def token_matches(secret: str, job_id: str, attempt: int, token: str) -> bool:
    """Whether `token` was made for this job and attempt with `secret` (constant time; False without a secret)."""
    if not secret or not token:
        return False
    return hmac.compare_digest(callback_token(secret, job_id, attempt).encode(), token.encode())
