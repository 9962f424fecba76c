"""KServe's InferenceGRPCClient and InferenceRESTClient against gradserve (oip_kserve_clients.py).

They run in a fresh interpreter: kserve cannot be imported into a process that has imported
tritonclient.grpc (both register ``inference.*`` in protobuf's default pool), as the other OIP
tests do. kserve is in the ``test`` extra.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).with_name("oip_kserve_clients.py")


def test_kserve_clients_against_gradserve() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=280,
                          cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout
