"""Settings of the voices service."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from timbre_common.settings import CommonSettings


class VoicesSettings(CommonSettings):
    db_schema: ClassVar[str] = "voices"
    max_reference_bytes: int = 20 * 1024 * 1024
    min_reference_s: float = 5.0
    max_reference_s: float = 60.0
    # Rate the models get: references are normalised to mono 16-bit at this rate.
    reference_sample_rate: int = 24000
    # Custom voices one account may keep (409 voice_limit_reached past it).
    max_voices_per_account: int = Field(default=100, gt=0)
