"""Checkout keys at rest: AES-256-GCM under a key derived from a secret setting, bound to their checkout token.

A key minted after a paid checkout waits in gateway.checkout_keys for the success page's single read; a copy of
the database (a backup, a replica, a read-only role) must not hand out working API keys, so only the sealed form
is stored.
"""
from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_PREFIX = "v1."
_NONCE = 12


class Unreadable(Exception):
    """A sealed value this key cannot open (another secret, or changed bytes)."""


class CheckoutKeySealer:
    """Seals and opens checkout API keys; the checkout token is the associated data, so a sealed key moved to
    another checkout's row does not open."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("a sealing secret is required")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"timbre checkout keys v1").derive(secret.encode())
        self._aead = AESGCM(key)

    def seal(self, token: str, api_key: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, api_key.encode(), token.encode())
        return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def open(self, token: str, stored: str) -> str:
        """The plaintext of a sealed value. A value without the prefix was written before keys were sealed (at
        most CHECKOUT_KEY_TTL_S old) and is returned as it is."""
        if not stored.startswith(_PREFIX):
            return stored
        try:
            raw = base64.urlsafe_b64decode(stored[len(_PREFIX):])
            return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], token.encode()).decode()
        except (InvalidTag, ValueError) as exc:
            raise Unreadable("sealed checkout key does not open") from exc
