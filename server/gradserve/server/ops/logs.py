"""Structured server logs: every record carries the id of the request being served.

``configure`` installs a handler whose records have ``request_id`` (from the current
``calls.CallControl``, "-" outside a request) and, with ``fmt="json"``, are written one JSON
object per line with any ``extra=`` fields, for log pipelines that index fields.

One record is one line in either format: a request id or a model name comes from the caller, and
a newline in it must not forge a log line. JSON escapes control characters; the text format
escapes them too (``TextFormatter``: a newline becomes a backslash and ``n``, others ``\\xNN``). A
traceback after the record's line keeps its own lines.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from gradserve.server.ops import calls

__all__ = ["RequestIdFilter", "JsonFormatter", "TextFormatter", "escape_controls", "configure"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

# Attributes every LogRecord has; anything else was passed with extra= and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` from the current call (unless the record has one already)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            control = calls.current()
            record.request_id = control.request_id if control is not None and control.request_id else "-"
        return True


# C0 and C1 controls, DEL, and the characters str.splitlines and some log viewers break lines at.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """``text`` with its control and line-breaking characters written as escapes."""
    return _CONTROLS.sub(_escaped, text)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` lines whose record part (time, level, logger, request id, message) never
    breaks: control characters are escaped. A traceback that follows keeps its lines."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", fmt: str = "text", stream: Any = None) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) as text or JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    return handler
