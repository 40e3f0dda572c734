"""Logs are JSON lines with the correlation id, and no secret survives into them, wherever it hides."""
from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from timbre_common.logging import configure_logging, correlation, get_logger

SIGNED = "http://127.0.0.1:8001/blobs/generations/a/b.wav?expires=1795254545&signature=92ef6beb4d90ad31a4b0f72f"
KEY = "tb_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


@pytest.fixture
def lines():
    out = io.StringIO()
    structlog.reset_defaults()
    configure_logging("probe", stream=out)

    def read() -> list[dict]:
        return [json.loads(line) for line in out.getvalue().splitlines() if line]

    yield read
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = []


def test_json_lines_carry_the_service_and_correlation_id(lines):
    with correlation("req-123"):
        get_logger("t").info("did_something", n=3)
    [record] = lines()
    assert (record["event"], record["service"], record["correlation_id"], record["n"]) == \
        ("did_something", "probe", "req-123", 3)


def test_secrets_are_redacted_by_field_name_and_inside_any_text(lines):
    log = get_logger("t")
    log.info("fetched", url=SIGNED, api_key=KEY, authorization="Bearer x", detail=f"with {KEY} inside")
    try:
        raise RuntimeError(f"failed on {SIGNED} with {KEY} and sk_live_0123456789abcdef")
    except RuntimeError:
        log.exception("boom")
    logging.getLogger("aiormq").error("Unhandled message body=b'%s'", SIGNED)
    records = lines()
    text = json.dumps(records)
    assert "92ef6beb4d90" not in text and "AbCdEfGhIjKl" not in text and "0123456789abcdef" not in text
    assert records[0]["api_key"] == "[redacted]" and records[0]["authorization"] == "[redacted]"
    assert records[0]["url"].endswith("signature=[redacted]") and "tb_[redacted]" in records[0]["detail"]
    assert "RuntimeError" in records[1]["exception"]  # the traceback survives, its secrets do not
    assert records[2]["logger"] == "aiormq" and "signature=[redacted]" in records[2]["event"]
