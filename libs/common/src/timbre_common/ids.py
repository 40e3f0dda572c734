"""Identifiers as clients may send them."""
from __future__ import annotations

import uuid


def is_canonical_uuid(value: str) -> bool:
    """True only for the canonical 8-4-4-4-12 hex form: other spellings uuid.UUID accepts ({...}, urn:uuid:...,
    no hyphens) are refused rather than passed on to a database that reads them differently."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False
