"""`gradserve serve --model-dir` against hostile model folders: version names that are not
canonical positive int64 numbers, corrupt and symlinked model files, folders that resolve
outside the model directory. The rest of the directory loads, health reaches SERVING, every
skip is logged once with its reason, and hot reload goes on after bad folders appear."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import gradserve
from subprocess_server import ServeProcess, serve_env, wait_for

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


def _linear(k: float) -> Any:
    """y = k·Σx: the gradient is k everywhere, so it tells the version apart."""
    inputs = keras.Input((4,), name="x")
    out = keras.layers.Dense(1, use_bias=False, name="y", kernel_initializer=keras.initializers.Constant(k))(inputs)
    return keras.Model(inputs, out)


def _save(k: float, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _linear(k).save(str(folder / "model.keras"))
    return folder / "model.keras"


def _states(client: gradserve.Client, name: str) -> dict[int, str]:
    return {v.version: v.state for v in client.model_info(name, refresh=True).versions}


@pytest.fixture()
def layout(tmp_path: Path) -> dict[str, Path]:
    root, outside = tmp_path / "models", tmp_path / "outside"
    _save(1.0, root / "m" / "1")
    _save(3.0, root / "m" / "03")                     # not canonical: must not alias version 3
    _save(9.0, root / "m" / "\u00b2")                 # '²'.isdigit() is True, int('²') fails
    _save(8.0, root / "m" / "99999999999999999999")   # past int64
    _save(7.0, root / "m" / "0")                      # versions are positive
    far = _save(5.0, outside / "lin5")
    os.symlink(outside / "lin5", root / "m" / "5")    # a version folder outside the model dir
    (root / "c" / "1").mkdir(parents=True)
    (root / "c" / "1" / "model.keras").write_bytes(b"not a zip archive")
    (root / "s" / "1").mkdir(parents=True)
    (root / "s" / "notes.txt").write_text("release notes\n")
    os.symlink(root / "s" / "notes.txt", root / "s" / "1" / "model.keras")  # inside, not a model
    (root / "e" / "1").mkdir(parents=True)
    os.symlink(far, root / "e" / "1" / "model.keras")  # a model file outside the model dir
    return {"root": root, "outside": outside, "log": tmp_path / "server.log"}


def _serve(layout: dict[str, Path], *flags: str) -> ServeProcess:
    return ServeProcess(layout["log"], "--model-dir", str(layout["root"]), "--poll-seconds", "0.2", "--xla", "off",
                        "--max-bucket", "2", *flags, env=serve_env(PYTHONIOENCODING="utf-8"))


def test_bad_folders_are_skipped_with_a_reason_and_the_rest_serves(layout: dict[str, Path]) -> None:
    root = layout["root"]
    with _serve(layout) as server:
        server.wait_serving()
        with gradserve.Client(server.address, timeout=60) as c:
            assert {m.name for m in c.models()} == {"m", "c", "s", "e"}  # ListModels answers
            assert _states(c, "m") == {1: "READY"}
            np.testing.assert_allclose(c.gradient("m", X), np.full_like(X, 1.0))
            for version in (3, 5):
                with pytest.raises(gradserve.NotFound):
                    c.gradient("m", X, version=version)
            (corrupt,) = c.model_info("c").versions
            assert corrupt.state == "FAILED"
            assert "not a Keras archive" in corrupt.message and "File not found" not in corrupt.message
            (notes,) = c.model_info("s").versions
            assert notes.state == "FAILED" and "not a Keras archive" in notes.message
            (far,) = c.model_info("e").versions
            assert far.state == "FAILED"
            assert "outside the model directory" in far.message and "--follow-symlinks" in far.message

            # Bad folders appearing while the server runs stop nothing: version 2 still loads.
            _save(4.0, root / "m" / "\u2074")  # '⁴'
            _save(6.0, root / "m" / "006")
            staged = root / "m" / ".2.tmp"
            _save(2.0, staged)
            staged.rename(root / "m" / "2")
            wait_for(lambda: _states(c, "m").get(2) == "READY", "version 2 READY")
            np.testing.assert_allclose(c.gradient("m", X), np.full_like(X, 2.0))
            assert _states(c, "m") == {1: "READY", 2: "READY"}
        assert server.terminate(60) == 0
    text = server.log_path.read_text(encoding="utf-8", errors="replace")
    # Each skip is logged with its reason, once (not at every rescan).
    for name, reason in (("03", "leading zero"), ("\u00b2", "ASCII digits"), ("99999999999999999999", "int64"),
                         ("0", "positive"), ("\u2074", "ASCII digits"), ("006", "leading zero"),
                         ("5", "outside the model directory")):
        lines = [line for line in text.splitlines() if "skipping" in line and f"/m/{name}'" in line]
        assert len(lines) == 1, (name, lines)
        assert reason in lines[0], lines[0]


def test_follow_symlinks_serves_what_resolves_outside(layout: dict[str, Path]) -> None:
    with _serve(layout, "--follow-symlinks") as server:
        server.wait_serving()
        with gradserve.Client(server.address, timeout=60) as c:
            assert _states(c, "m") == {1: "READY", 5: "READY"}
            np.testing.assert_allclose(c.gradient("m", X), np.full_like(X, 5.0))
            np.testing.assert_allclose(c.gradient("e", X), np.full_like(X, 5.0))
        assert server.terminate(60) == 0
