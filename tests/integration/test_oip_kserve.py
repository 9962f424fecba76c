"""KServe's InferenceGRPCClient and InferenceRESTClient against gradserve (oip_kserve_clients.py).

They run in a fresh interpreter: kserve cannot be imported into a process that has imported
tritonclient.grpc (both register ``inference.*`` in protobuf's default pool), as the other OIP
tests do. Skipped where kserve is not installed: every kserve release for protobuf 6 requires
grpcio-tools>=1.73, which the ``test`` extra's grpcio-tools==1.72.1 pin excludes.
"""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("oip_kserve_clients.py")


@pytest.mark.skipif(importlib.util.find_spec("kserve") is None, reason="kserve is not installed")
def test_kserve_clients_against_gradserve() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=280,
                          cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout
