"""The Node.js example (examples/node/client.js, built from protos/ alone) against a real server.

Skipped where Node.js or the example's packages (`npm ci --prefix examples/node`) are missing;
.ci/run installs them before the suite, so CI always runs it.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "node"


@pytest.mark.skipif(shutil.which("node") is None or not (EXAMPLE / "node_modules").is_dir(),
                    reason="needs node and `npm ci --prefix examples/node`")
def test_node_client_checks_gradient_stream_errors_and_reflection(demo_server):
    proc = subprocess.run(["node", str(EXAMPLE / "client.js"), demo_server.address],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gradient 0.5" in proc.stdout and "b=response" in proc.stdout and "bad=error" in proc.stdout
