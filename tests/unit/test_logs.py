"""Server log records: one record, one line. Text from a caller (a request id, a model name in a
message) cannot forge log lines in either format: control characters are escaped."""
from __future__ import annotations

import io
import json
import logging

import pytest

from gradserve.server.ops import logs

FORGED = "req-1\n2026-01-01 00:00:00,000 ERROR gradserve.server [-] forged\r\x1b[2K\x00\u2028end"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_request_id_with_control_characters_stays_on_its_line(fmt: str) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buffer = io.StringIO()
    try:
        logs.configure("DEBUG", fmt, stream=buffer)
        log = logging.getLogger("gradserve.server.requests")
        log.info("request done: model %r", "m\nodel", extra={"request_id": FORGED})
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("failed", extra={"request_id": "r2"})
    finally:
        root.handlers[:], root.level = saved
    lines = buffer.getvalue().splitlines()
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        assert [r["request_id"] for r in records] == [FORGED, "r2"]   # escaped by JSON, read back as sent
        assert records[0]["message"] == "request done: model 'm\\nodel'"
        assert "ValueError: bad" in records[1]["exception"]
        return
    first = lines[0]
    assert "[req-1\\n2026-01-01 00:00:00,000 ERROR gradserve.server [-] forged\\r\\x1b[2K\\x00\\u2028end]" in first
    assert first.endswith("request done: model 'm\\nodel'")
    assert not any("forged" in line for line in lines[1:])
    # A traceback keeps its lines (the server's own text).
    assert lines[1].endswith("[r2] failed") and lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: bad"
