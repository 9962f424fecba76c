"""Hardening pieces that need no TensorFlow and no sockets: deadline arithmetic, the per-call
stop check, bearer-token matching and JSON log lines."""
from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import pytest

from gradserve.server.config import Limits
from gradserve.server.core.control import CallControl
from gradserve.server.core.errors import CancelledError, DeadlineExceededError
from gradserve.server.core.spec import PreparedCall
from gradserve.server.ops import calls, logs
from gradserve.server.ops.auth import BearerTokenInterceptor


def test_effective_timeout_uses_default_and_caps_at_maximum() -> None:
    limits = Limits(default_deadline_s=60.0, max_deadline_s=600.0)
    assert calls.effective_timeout(None, limits) == 60.0
    assert calls.effective_timeout(5.0, limits) == 5.0
    assert calls.effective_timeout(3600.0, limits) == 600.0
    assert calls.effective_timeout(None, Limits(default_deadline_s=900.0, max_deadline_s=600.0)) == 600.0


def _call() -> PreparedCall:
    return PreparedCall(("predict",), {"input/x": np.zeros((2, 1), np.float32)})


def test_prepared_call_check_stops_cancelled_and_expired_work() -> None:
    call = _call()
    call.check()  # no control (a merged call): goes on
    assert call.deadline is None
    call.control = CallControl(deadline=time.monotonic() + 3600)
    call.check()
    assert call.deadline == call.control.deadline
    call.control.cancelled.set()
    with pytest.raises(CancelledError):
        call.check()
    expired = _call()
    expired.control = CallControl(deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceededError, match="deadline"):
        expired.check()


def test_the_envelope_gives_each_call_one_deadline_and_counts_it_in_and_out() -> None:
    limits = Limits(default_deadline_s=60.0, max_deadline_s=600.0, max_concurrent_calls=1)
    envelope = calls.CallEnvelope(limits)
    with envelope.open("native", "Compute", None) as call:
        assert calls.current() is call.control
        assert call.control.remaining() == pytest.approx(60.0, abs=5.0)  # the default deadline
        call.describe("dense2", "gradient", 2, "rid-1")
        call.admit(1000)
        assert envelope.admission.calls == 1 and envelope.memory.held == 1000
        with envelope.open("native", "Compute", 5.0) as second:  # the caller's deadline binds
            assert second.control.remaining() == pytest.approx(5.0, abs=1.0)
            second.admit()  # past --max-concurrent-calls: refused, answered, nothing held
        assert second.code.name == "RESOURCE_EXHAUSTED" and "--max-concurrent-calls" in second.message
    assert call.code.name == "OK" and calls.current() is None
    assert envelope.admission.calls == 0 and envelope.memory.held == 0
    with envelope.open("native", "ComputeStream", None, stream=True) as stream:
        assert stream.control.remaining() == pytest.approx(600.0, abs=5.0)  # a stream: only the maximum


@pytest.mark.parametrize("metadata,accepted", [
    ((("authorization", "Bearer tok-1"),), True),
    ((("authorization", "bearer tok-2"),), True),
    ((("authorization", b"Bearer tok-1"),), True),
    ((("authorization", "Bearer tok-3"),), False),
    ((("authorization", "Bearer tok-"),), False),
    ((("authorization", "tok-1"),), False),
    ((), False),
    (None, False),
])
def test_bearer_token_matching(metadata: object, accepted: bool) -> None:
    assert BearerTokenInterceptor(["tok-1", "tok-2"]).accepts(metadata) is accepted  # type: ignore[arg-type]


def test_json_log_lines_carry_the_current_request_id() -> None:
    buffer = io.StringIO()
    handler = logs.configure("DEBUG", "json", buffer)
    try:
        with calls.CallEnvelope(Limits()).open("native", "Compute") as call:
            call.describe("dense2", "gradient", 1, "rid-42")
            logging.getLogger("gradserve.test").info("hello %s", "world", extra={"model": "dense2"})
        logging.getLogger("gradserve.test").warning("outside")
    finally:
        logging.getLogger().removeHandler(handler)
    first, done, second = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert first["message"] == "hello world" and first["request_id"] == "rid-42" and first["model"] == "dense2"
    # The envelope's line per request, at DEBUG: protocol, model, method, status and time.
    assert done["message"] == "request done" and done["request_id"] == "rid-42"
    assert (done["protocol"], done["model"], done["method"], done["code"]) == ("native", "dense2", "gradient", "OK")
    assert second["request_id"] == "-" and second["level"] == "WARNING"


def test_cli_flags_fill_limits_and_security_options() -> None:
    from gradserve.server.process import cli

    args = cli.build_parser().parse_args([
        "serve", "--max-message-bytes", "1000", "--max-batch", "7", "--max-elements", "99", "--max-rank", "3",
        "--max-steps", "5", "--max-samples", "6", "--max-jacobian-elements", "11", "--max-concurrent-rpcs", "4",
        "--default-deadline", "2.5", "--max-deadline", "9", "--reject-nonfinite", "--tls-cert", "c.pem",
        "--tls-key", "k.pem", "--tls-client-ca", "ca.pem", "--auth-token-file", "t.txt", "--metrics-port", "9100",
        "--log-format", "json"])
    assert cli._limits(args) == Limits(max_message_bytes=1000, max_batch=7, max_elements=99, max_rank=3, max_steps=5,
                                       max_samples=6, max_jacobian_elements=11, max_concurrent_rpcs=4,
                                       default_deadline_s=2.5, max_deadline_s=9.0, reject_nonfinite=True)
    assert (args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file, args.metrics_port,
            args.log_format) == ("c.pem", "k.pem", "ca.pem", "t.txt", 9100, "json")
    defaults = cli.build_parser().parse_args(["serve"])
    assert cli._limits(defaults) == Limits() and defaults.metrics_port == 0 and defaults.auth_token_file is None
