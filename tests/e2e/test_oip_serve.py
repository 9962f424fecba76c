"""`gradserve serve --http-port`: the OIP REST endpoint from the CLI, and SIGTERM still drains
and exits 0 (uvicorn runs on the server's loop and must not take the process's signals)."""
from __future__ import annotations

from pathlib import Path

import httpx

from subprocess_server import ServeProcess, free_port


def test_serve_http_port_then_sigterm_exits_cleanly(tmp_path: Path) -> None:
    http_port = free_port()
    with ServeProcess(tmp_path / "server.log", "--http-port", str(http_port)) as server:
        server.wait_serving()
        base = f"http://127.0.0.1:{http_port}"
        assert httpx.get(f"{base}/v2/health/ready", timeout=30).json() == {"ready": True}
        body = {"parameters": {"method": "gradient"}, "outputs": [{"name": "alpha"}, {"name": "attributions/input"}],
                "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        alpha, grads = httpx.post(f"{base}/v2/models/dense2/infer", json=body, timeout=60).json()["outputs"]
        assert abs(alpha["data"][0] - 5.1) < 1e-5 and all(abs(g - 0.5) < 1e-6 for g in grads["data"])
        assert server.terminate(60) == 0
    assert f"Open Inference Protocol on http://127.0.0.1:{http_port}/v2" in server.log_text()
