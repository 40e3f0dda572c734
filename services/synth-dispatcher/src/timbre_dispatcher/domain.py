"""The dispatcher's rules: cache keys and job states."""
from __future__ import annotations

import hashlib

PENDING, READY, FAILED = "pending", "ready", "failed"


def cache_key(voice_id: str, text: str, lang: str, backend: str) -> str:
    """sha256(voice_id \\0 text \\0 lang \\0 backend): the seed's key plus the voice, null-separated."""
    return hashlib.sha256("\x00".join((voice_id, text, lang, backend)).encode()).hexdigest()
