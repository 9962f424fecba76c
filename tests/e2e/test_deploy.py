"""deploy/install.sh, what the container image runs at build time, against a freshly built wheel:
install into a new virtual environment, serve from it, pass the image's health check, drain.

No image is built here (no container daemon); the Dockerfile only copies files and runs this
script. The new environment gets the test environment's dependencies (TensorFlow, gRPC, ...)
through a path file instead of downloading them again, and pip runs without an index, so the
wheel's own metadata must be satisfiable by them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from subprocess_server import ServeProcess, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def _share_dependencies(prefix: Path, into: Path) -> None:
    """Make this environment's installed packages, except gradserve itself, visible in ``prefix``."""
    deps = into / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.lower().startswith(("gradserve", "__editable__")) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    site = subprocess.run([str(prefix / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "test-deps.pth").write_text(f"{deps}\n")


def _save_model(path: Path) -> None:
    import keras

    inputs = keras.Input((4,), name="input")
    outputs = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(0.5))(inputs)
    path.parent.mkdir(parents=True)
    keras.Model(inputs, outputs).save(path)


def test_install_sh_installs_the_wheel_and_serves(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, timeout=300)
    wheel = next(dist.glob("gradserve-*.whl"))
    prefix = tmp_path / "opt" / "gradserve"
    subprocess.run([sys.executable, "-m", "venv", str(prefix)], check=True, timeout=300)
    _share_dependencies(prefix, tmp_path)
    env = dict(os.environ, PIP_NO_INDEX="1", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    out = subprocess.run(["sh", str(ROOT / "deploy" / "install.sh"), str(wheel), str(prefix)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    # The installed package is the wheel's (subpackages included), not this checkout.
    where = subprocess.run([str(prefix / "bin" / "python"), "-c",
                            "import gradserve, gradserve.server.compute.methods as m; "
                            "print(gradserve.__file__, m.__file__)"],
                           env=env, cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert where.count(str(prefix)) == 2, where

    models = tmp_path / "models"
    _save_model(models / "lin" / "1" / "model.keras")
    port = free_port()
    check = [str(prefix / "bin" / "gradserve-healthcheck"), f"127.0.0.1:{port}"]
    assert subprocess.run(check, env=env, capture_output=True, timeout=60).returncode == 1   # nothing listens
    with ServeProcess(tmp_path / "server.log", "--model-dir", str(models), "--xla", "off", port=port, env=env,
                      executable=[str(prefix / "bin" / "gradserve")], cwd=tmp_path) as server:

        def healthy() -> bool:
            assert server.poll() is None, server.log_text()
            return subprocess.run(check, env=env, capture_output=True, timeout=60).returncode == 0

        wait_for(healthy, "the image's health check to pass", 300, interval=1.0)
        import numpy as np

        import gradserve

        with gradserve.Client(server.address) as c:
            assert np.allclose(c.gradient("lin", np.ones((2, 4))), 0.5)
        assert server.terminate(120) == 0
