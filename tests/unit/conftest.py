"""Fixtures of the unit tier (no TensorFlow, no sockets)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def generator_path(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """sys.path entries under which tools/gen_protos.py runs with its own grpcio-tools (installed
    into a private folder once: no extra depends on that exact version, see gen_protos)."""
    tools = pathlib.Path(__file__).resolve().parents[2] / "tools"
    sys.path.insert(0, str(tools))
    try:
        import gen_protos
    finally:
        sys.path.pop(0)
    target = tmp_path_factory.mktemp("grpcio-tools")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--target", str(target), f"grpcio-tools=={gen_protos.GRPCIO_TOOLS}"],
                   check=True, capture_output=True, timeout=300)
    return [str(target), str(tools)]
