"""The one length-based figure for how long a synthesis may take."""
from __future__ import annotations

from timbre_common.catalogue import KNOWN_BACKENDS, SYNTHESIS_FLOOR_S, expected_synthesis_seconds


def test_expected_time_scales_with_length_above_a_floor() -> None:
    for backend in KNOWN_BACKENDS:
        floor = SYNTHESIS_FLOOR_S[backend]
        assert expected_synthesis_seconds(backend, 0) == floor
        assert expected_synthesis_seconds(backend, 1) == floor
        long_, longer = expected_synthesis_seconds(backend, 5000), expected_synthesis_seconds(backend, 10000)
        assert long_ > floor and longer == 2 * long_


def test_the_bigger_model_gets_more_time_and_unknown_backends_a_safe_default() -> None:
    assert expected_synthesis_seconds("qwen3-1.7b", 5000) > expected_synthesis_seconds("qwen3-0.6b", 5000)
    assert expected_synthesis_seconds("qwen3-0.6b", 5000) > expected_synthesis_seconds("embedded", 5000)
    assert expected_synthesis_seconds("something-new", 5000) >= expected_synthesis_seconds("qwen3-1.7b", 5000)
