"""`gradserve serve` as a subprocess: demo models, health, a call, SIGTERM, exit code 0; its text
log keeps one line per record whatever request id a caller sends."""
from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

import gradserve
from gradserve import _codec
from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc
from subprocess_server import ServeProcess

FORGED = "req-7\n2026-01-01 00:00:00,000 ERROR gradserve.server [-] forged by a caller"


def test_serve_demo_models_then_sigterm_exits_cleanly(tmp_path: Path) -> None:
    with ServeProcess(tmp_path / "server.log", "--log-level", "DEBUG") as server:
        server.wait_serving()
        with gradserve.Client(server.address) as c:
            x = np.arange(12, dtype=np.float32).reshape(3, 4)
            y, g = c.gradient("dense2", x, return_outputs=True)
            np.testing.assert_allclose(g, 0.5, rtol=1.2e-7, atol=0)
            np.testing.assert_allclose(y[:, 0], 0.5 * x.sum(1) + 0.1, rtol=1e-6)
        with grpc.insecure_channel(server.address) as ch:
            request = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT, request_id=FORGED)
            _codec.encode(x, out=request.inputs["input"])
            pb_grpc.SensitivityServiceStub(ch).Compute(request, timeout=60)
        assert server.terminate(60) == 0
    text = server.log_text()
    assert f"listening on 127.0.0.1:{server.port}" in text
    assert "model dense2 version 1 READY" in text
    # The request's log record is one line, its request id escaped; no line starts with the forgery.
    (record,) = [line for line in text.splitlines() if "req-7" in line]
    assert "[req-7\\n2026-01-01 00:00:00,000 ERROR gradserve.server [-] forged by a caller]" in record
    assert not any(line.startswith("2026-01-01") for line in text.splitlines())
