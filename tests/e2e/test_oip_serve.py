"""`gradserve serve --http-port`: the OIP REST endpoint from the CLI, and SIGTERM still drains
and exits 0 (uvicorn runs on the server's loop and must not take the process's signals)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from subprocess_server import free_port, wait_serving


def test_serve_http_port_then_sigterm_exits_cleanly(tmp_path: Path, log_file: Any) -> None:
    port, http_port = free_port(), free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    log = log_file(tmp_path / "server.log")
    proc = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--port", str(port),
                             "--http-port", str(http_port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        base = f"http://127.0.0.1:{http_port}"
        assert httpx.get(f"{base}/v2/health/ready", timeout=30).json() == {"ready": True}
        body = {"parameters": {"method": "gradient"}, "outputs": [{"name": "alpha"}, {"name": "attributions/input"}],
                "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        alpha, grads = httpx.post(f"{base}/v2/models/dense2/infer", json=body, timeout=60).json()["outputs"]
        assert abs(alpha["data"][0] - 5.1) < 1e-5 and all(abs(g - 0.5) < 1e-6 for g in grads["data"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    assert f"Open Inference Protocol on http://127.0.0.1:{http_port}/v2" in log.read()
