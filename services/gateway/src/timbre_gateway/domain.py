"""API keys: minting and hashing. Only the hash is ever stored."""
from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "tb_"


def mint_api_key() -> str:
    """A new key: a recognisable prefix and 256 bits of randomness."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX) and 20 <= len(value) <= 128 and value.isascii()

