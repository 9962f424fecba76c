"""`gradserve serve` as a subprocess: demo models, health, a call, SIGTERM, exit code 0."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np

import gradserve
from subprocess_server import free_port, wait_serving


def test_serve_demo_models_then_sigterm_exits_cleanly(tmp_path, log_file):
    port = free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    log = log_file(tmp_path / "server.log")
    proc = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        with gradserve.Client(f"127.0.0.1:{port}") as c:
            x = np.arange(12, dtype=np.float32).reshape(3, 4)
            y, g = c.gradient("dense2", x, return_outputs=True)
            np.testing.assert_allclose(g, 0.5, rtol=1.2e-7, atol=0)
            np.testing.assert_allclose(y[:, 0], 0.5 * x.sum(1) + 0.1, rtol=1e-6)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    text = log.read()
    assert f"listening on 127.0.0.1:{port}" in text
    assert "model dense2 version 1 READY" in text
