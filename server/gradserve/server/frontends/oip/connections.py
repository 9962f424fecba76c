"""The HTTP connections of the OIP REST port: uvicorn's httptools protocol with our own bounds.

uvicorn bounds neither the headers of a request (llhttp has no limit, and httptools joins a
header's pieces as they come), nor how long a client may take to send them or the body, nor
how many connections are open. ``protocol_class(limits)`` is the protocol the REST server runs
instead, one per connection:

- **headers**: the request line and header lines are counted as their bytes arrive, before the
  parser sees them: more than ``http_max_header_bytes`` in all, a line of more than
  ``http_max_header_line_bytes`` or more than ``http_max_headers`` lines is answered 431 and
  the connection closed. What is held for a request's head is therefore bounded whatever a
  client sends (a flood of tiny header lines cost about 25 times its size in Python objects);
- **time**: a connection with no request in progress is closed after ``http_idle_timeout_s``
  (keep-alive, and a connection that never sends anything); a request's line and headers must
  arrive within ``http_header_timeout_s`` of their first byte and its body within
  ``http_body_timeout_s`` of its headers, else 408 and the connection closed. The time a
  request spends being computed is the call's deadline's business, not this module's;
- **connections**: past ``http_max_connections`` open at once, a new one is answered 503 and
  closed.

Connections closed for these reasons are logged at most once per ``LOG_INTERVAL_S`` with a
count (``Reporter``), never one line each.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gradserve.server.config import Limits

__all__ = ["protocol_class", "Reporter", "LOG_INTERVAL_S"]

_log = logging.getLogger("gradserve.server")

#: Refused connections and abandoned requests are logged at most once per this many seconds.
LOG_INTERVAL_S = 60.0

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class Reporter:
    """Counts events of one kind and logs them at most once per ``LOG_INTERVAL_S`` (thread-safe)."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._lock = threading.Lock()
        self._count = 0
        self._next = 0.0

    def note(self, latest: str) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now < self._next:
                return
            count, self._count, self._next = self._count, 0, now + LOG_INTERVAL_S
        _log.warning("%s: %d since the last report (latest: %s)", self._what, count, latest)


#: Connections this module closed (headers too large, timeouts, too many connections).
CLOSED = Reporter("HTTP connections closed by the server's limits")


def _response(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under ``LIMITS`` (set on the subclass ``protocol_class`` makes)."""

    LIMITS: ClassVar[Limits] = Limits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The head being read (request line and header lines): its bytes, the bytes of its
        # current line, its lines, and whether the current line so far is exactly b"\r".
        self._head = 0
        self._line = 0
        self._lines = 0
        self._cr = False
        #: Reading (or waiting for) a request's head, as opposed to its body or its answer.
        self._in_head = True
        #: The parser's view: a message has begun, and its headers are complete.
        self._begun = False
        self._headers_done = False
        # One timer per connection, moved lazily: a phase sets its deadline, and the timer (which
        # may be set for later) is only moved earlier when it must; when it fires early it is set
        # again for the deadline of the phase then. Most requests start no timer at all.
        self._phase: str | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # -- the connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        limit = self.LIMITS.http_max_connections
        if limit and len(self.connections) > limit:
            self._refuse(503, f"connections: {limit} HTTP connections are open, the server's limit "
                              "(--http-max-connections); retry later")
            return
        self._arm(self.LIMITS.http_idle_timeout_s, "idle")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            if not (self._head or self._line or self._lines) and data:
                self._arm(self.LIMITS.http_header_timeout_s, "header")
            problem = self._count_head(data)
            if problem is not None:
                self._refuse(431, problem)
                return
        super().data_received(data)
        if self.parser is not None:
            # The parser decides where heads end; the count above only stops at a blank line
            # so that a body in the same read is not counted as header lines.
            self._in_head = not (self._begun and self._headers_done)

    def _count_head(self, data: bytes) -> str | None:
        """Count ``data`` into the head being read, up to its blank line; a message when a limit
        is passed. A line's bytes are counted without its line ending, the head's with them all."""
        limits = self.LIMITS
        max_line, max_head = limits.http_max_header_line_bytes, limits.http_max_header_bytes
        if not (self._head or self._line or self._lines) and data[:1] not in (b"\r", b"\n"):
            # The common case: a whole head of short lines in one read.
            end = data.find(b"\r\n\r\n", 0, max_head)
            if 0 <= end <= max_line and data.count(b"\n", 0, end) <= limits.http_max_headers:
                self._in_head = False
                return None
        pos, n = 0, len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            stop = n if nl < 0 else nl
            self._line += stop - pos
            self._head += stop - pos + (nl >= 0)
            if self._head > max_head:
                return f"headers: more than {max_head} bytes of request line and headers (--http-max-header-bytes)"
            if nl < 0:
                self._cr = data[n - 1] == 13   # may be the line's ending
                content = self._line - self._cr
            else:
                content = self._line - (data[nl - 1] == 13 if nl > pos else self._cr)
            if content > max_line:
                return f"headers: a line of more than {max_line} bytes (--http-max-header-line-bytes)"
            if nl < 0:
                return None
            self._line, self._cr, pos = 0, False, nl + 1
            if content == 0:
                if self._lines:  # the blank line: what follows is the body
                    self._in_head = False
                    return None
                continue  # empty lines before a request line are ignored (RFC 9112, section 2.2)
            self._lines += 1
            if self._lines > limits.http_max_headers + 1:
                return f"headers: more than {limits.http_max_headers} header lines (--http-max-headers)"
        return None

    # -- the parser's callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun, self._headers_done = True, False

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._headers_done = True
        self._arm(self.LIMITS.http_body_timeout_s, "body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._begun = False
        self._head = self._line = self._lines = 0
        self._cr = False
        self._disarm()
        if self.cycle is not None and self.cycle.response_complete:  # answered before its body was read
            self._arm(self.LIMITS.http_idle_timeout_s, "idle")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._begun and not self.transport.is_closing():  # waiting for the next request
            self._arm(self.LIMITS.http_idle_timeout_s, "idle")

    # -- timers and refusals ----------------------------------------------------------------------
    def _arm(self, seconds: float, phase: str) -> None:
        if seconds <= 0:
            self._phase = None
            return
        self._phase = phase
        self._deadline = deadline = self.loop.time() + seconds
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._tick)

    def _disarm(self) -> None:
        self._phase = None

    def _tick(self) -> None:
        self._timer = None
        phase = self._phase
        if phase is None or self.transport.is_closing():
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._tick)
            return
        self._phase = None
        self._expire(phase)

    def _expire(self, phase: str) -> None:
        if phase == "idle":
            self.transport.close()
            return
        limit = self.LIMITS.http_header_timeout_s if phase == "header" else self.LIMITS.http_body_timeout_s
        flag = "--http-header-timeout" if phase == "header" else "--http-body-timeout"
        self._refuse(408, f"{'headers' if phase == 'header' else 'body'}: not received within {limit:g} s ({flag})")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` (unless an answer is being written, or the request was answered
        already) and close the connection."""
        self._refused = True
        self._disarm()
        cycle = self.cycle
        writing = cycle is not None and cycle.response_started and not cycle.response_complete
        # A body that timed out belongs to the current cycle, which may have been answered early.
        answered = self._begun and self._headers_done and cycle is not None and cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            # Its handler sees a disconnect, and anything it still sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        if not writing and not answered:
            self.transport.write(_response(status, message))
        self.transport.close()
        CLOSED.note(f"{status} {message}")


def protocol_class(limits: Limits) -> type[asyncio.Protocol]:
    """The protocol class of a REST server under ``limits`` (uvicorn's ``http=``)."""
    return type("GradserveHttpProtocol", (GuardedProtocol,), {"LIMITS": limits})
