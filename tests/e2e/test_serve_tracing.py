"""`gradserve serve --otlp-endpoint URL` as a subprocess: its calls' spans reach an OTLP/gRPC
collector under the service name from OTEL_SERVICE_NAME, flushed by the SIGTERM drain (exit 0)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import opentelemetry.sdk.trace  # noqa: F401 - a missing backend must fail, not skip

import gradserve
from otlp_collector import Collector
from subprocess_server import free_port, wait_serving


def test_serve_exports_spans_to_the_otlp_endpoint(tmp_path: Path, log_file: Any) -> None:
    collector = Collector()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", OTEL_SERVICE_NAME="sensitivity-cli")
    log = log_file(tmp_path / "server.log")
    proc = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--port", str(port),
                             "--otlp-endpoint", f"http://127.0.0.1:{collector.port}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        with gradserve.Client(f"127.0.0.1:{port}") as c:
            np.testing.assert_allclose(c.gradient("dense2", np.ones((2, 4), np.float32)), 0.5, rtol=1e-6)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert collector.wait_for("encode"), (collector.names, log.seek(0), log.read())
        assert {"/gradserve.v1.SensitivityService/Compute", "engine", "encode"} <= set(collector.names)
        assert "/grpc.health.v1.Health/Check" not in collector.names  # probes are not traced
        assert {r.get("service.name") for r in collector.resources} == {"sensitivity-cli"}
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.stop()
