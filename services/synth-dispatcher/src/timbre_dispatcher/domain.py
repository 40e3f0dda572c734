"""The dispatcher's rules: cache keys and job states."""
from __future__ import annotations

from timbre_common.contracts.synthesis import cache_key

__all__ = ["FAILED", "PENDING", "READY", "cache_key"]

PENDING, READY, FAILED = "pending", "ready", "failed"
