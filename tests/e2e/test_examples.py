"""The examples in examples/ run as subprocesses against live servers (port 0) and do what they say."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def pricing_server(start_server, tmp_path_factory):
    """A server hosting the Black-Scholes model; importing the example registers its layer here."""
    sys.path.insert(0, EXAMPLES)
    try:
        import black_scholes
    finally:
        sys.path.remove(EXAMPLES)
    from gradserve.server.config import EngineConfig, ModelSource, ServerConfig

    path = black_scholes.save_model(str(tmp_path_factory.mktemp("bs") / "black_scholes.keras"))
    return start_server(ServerConfig(models=(ModelSource("black_scholes", path),),
                                     engine=EngineConfig(xla="off")))


def test_black_scholes_delta_matches_n_of_d1(pricing_server):
    out = run_example("black_scholes.py", "delta", "--target", pricing_server.address, "-n", "16").stdout
    assert "max |delta - N(d1)|" in out
    err = float(out.split("max |delta - N(d1)| = ")[1].split(";")[0])
    assert err < 1e-4
    assert len([line for line in out.splitlines() if line.strip() and line.split()[0][0].isdigit()]) == 16


def test_image_saliency_writes_a_png(demo_server, tmp_path):
    png = tmp_path / "saliency.png"
    out = run_example("image_saliency.py", "--target", demo_server.address, "--out", str(png), "--steps", "16").stdout
    assert f"wrote {png}" in out
    with open(png, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (800, 400)
