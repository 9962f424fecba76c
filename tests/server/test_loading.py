"""Model loaders: name validation, safe mode for Lambda layers and .h5 files, SavedModel signatures."""
from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradserve.server.compute.compiler import Compiler
from gradserve.server.config import EngineConfig, ModelSource, ServerConfig
from gradserve.server.core.errors import InvalidArgumentError
from gradserve.server.core.models import validate_model_name
from gradserve.server.models.loading import ModelLoadError, UnsafeModelError, load_model
from gradserve.server.models.repository import ModelRepository, scan_model_dir


@pytest.mark.parametrize("name", ["dense2", "price-v2", "a.b_c", "X9"])
def test_valid_model_names(name):
    assert validate_model_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../etc", "a/b", "a\\b", "with space", "é", "x" * 129])
def test_invalid_model_names_are_refused(name):
    with pytest.raises(InvalidArgumentError, match="invalid model name"):
        validate_model_name(name)


def test_invalid_name_from_the_command_line_is_a_startup_error(tmp_path):
    with pytest.raises(InvalidArgumentError, match="--model ../x"):
        cfg = ServerConfig(models=(ModelSource("../x", str(tmp_path / "m.keras")),))
        ModelRepository(cfg, Compiler(cfg.engine))


@pytest.fixture(scope="module")
def lambda_file(tmp_path_factory):
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: 3.0 * t, name="triple")(inputs))
    path = str(tmp_path_factory.mktemp("lam") / "lam.keras")
    model.save(path)
    return path


@pytest.fixture(scope="module")
def h5_file(tmp_path_factory):
    inputs = keras.Input((2,), name="x")
    out = keras.layers.Dense(1, name="y", kernel_initializer=keras.initializers.Constant(4.0))(inputs)
    path = str(tmp_path_factory.mktemp("h5") / "old.h5")
    keras.Model(inputs, out).save(path)
    return path


def _forward(fn, x):
    return fn.call({fn.inputs[0].name: tf.constant(x)})


def test_lambda_layer_is_refused_by_default(lambda_file):
    with pytest.raises(UnsafeModelError) as info:
        load_model(lambda_file)
    message = str(info.value)
    assert "Lambda" in message and "--trust-model-code" in message and "arbitrary code" in message


def test_lambda_layer_loads_with_trust(lambda_file):
    fn = load_model(lambda_file, trust_model_code=True)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (y,) = _forward(fn, x).values()
    np.testing.assert_allclose(y.numpy(), 3.0 * x)


def test_h5_is_refused_by_default_and_loads_with_trust(h5_file):
    with pytest.raises(UnsafeModelError, match=r"\.h5.*safe_mode.*--trust-model-code"):
        load_model(h5_file)
    fn = load_model(h5_file, trust_model_code=True)
    assert [s.name for s in fn.outputs] == ["y"]
    np.testing.assert_allclose(_forward(fn, np.ones((1, 2), np.float32))["y"].numpy(), [[8.0]])


def test_version_folder_needs_exactly_one_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no .keras file"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.keras"))


def test_saved_model_signature_names_and_gradient(tmp_path):
    class Scale(tf.Module):
        def __init__(self):
            self.w = tf.Variable([1.0, 2.0], name="w")

        @tf.function(input_signature=[tf.TensorSpec((None, 2), tf.float32, name="features")])
        def serve(self, features):
            return {"score": tf.reduce_sum(self.w * features ** 2, axis=1, keepdims=True)}

    module = Scale()
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.serve})
    fn = load_model(str(tmp_path))
    assert fn.keras_model is None
    assert [(s.name, s.dtype, s.shape) for s in fn.inputs] == [("features", np.dtype(np.float32), (None, 2))]
    assert [(s.name, s.shape) for s in fn.outputs] == [("score", (None, 1))]
    x = tf.constant([[1.0, 3.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(fn.call({"features": x})["score"])
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), [[2.0, 12.0]])


def test_scan_model_dir_layout(tmp_path):
    for p in ("a/1", "a/2", "a/.3.tmp", "a/notes", "b/7", "bad name/1", ".hidden/1"):
        os.makedirs(tmp_path / p)
    (tmp_path / "c.keras").write_bytes(b"")
    (tmp_path / "a" / "10").write_bytes(b"")  # a file, not a version folder
    found = scan_model_dir(str(tmp_path))
    assert {n: sorted(v) for n, v in found.items()} == {"a": [1, 2], "b": [7], "c": [1]}
    assert found["c"][1] == str(tmp_path / "c.keras")


def test_an_unreadable_model_dir_unloads_nothing(tmp_path):
    inputs = keras.Input((2,), name="x")
    keras.Model(inputs, keras.layers.Dense(1)(inputs)).save(str(tmp_path / "m.keras"))
    cfg = ServerConfig(model_dir=str(tmp_path), engine=EngineConfig(xla="off", warmup=False))
    repo = ModelRepository(cfg, Compiler(cfg.engine))
    repo.load_configured()
    assert [v.state.name for v in repo.versions("m")] == ["READY"]
    os.rename(tmp_path, str(tmp_path) + ".moved")
    repo.poll_once()
    assert [v.state.name for v in repo.versions("m")] == ["READY"]


@pytest.mark.parametrize("name", ["1", "10", "9223372036854775807"])
def test_canonical_version_folder_names(name):
    from gradserve.server.models.repository import version_folder_problem

    assert version_folder_problem(name) is None


@pytest.mark.parametrize("name, reason", [
    ("0", "positive"), ("000", "positive"), ("03", "leading zero"), ("\u00b2", "ASCII digits"),
    ("\u0663", "ASCII digits"), ("1.0", "ASCII digits"), ("-1", "ASCII digits"), ("+1", "ASCII digits"),
    (" 1", "ASCII digits"), ("9223372036854775808", "int64"), ("99999999999999999999", "int64"),
    ("1" * 5000, "int64"),  # past int()'s digit limit too
])
def test_other_version_folder_names_are_skipped_with_a_reason(tmp_path, name, reason):
    from gradserve.server.models.repository import scan, version_folder_problem

    assert reason in (version_folder_problem(name) or "")
    if len(name) < 200:  # a file name is at most 255 bytes
        os.makedirs(tmp_path / "m" / "1")
        os.makedirs(tmp_path / "m" / name)
        found = scan(str(tmp_path))
        assert found.models == {"m": {1: str(tmp_path / "m" / "1")}}
        assert reason in found.skipped[str(tmp_path / "m" / name)]


def test_links_out_of_the_model_dir_are_skipped_unless_followed(tmp_path):
    from gradserve.server.models.repository import scan

    root, outside = tmp_path / "models", tmp_path / "outside"
    os.makedirs(root / "m" / "1")
    os.makedirs(outside / "v")
    (outside / "x.keras").write_bytes(b"")
    os.symlink(outside / "v", root / "m" / "2")          # version folder
    os.symlink(outside, root / "far")                    # model folder
    os.symlink(outside / "x.keras", root / "x.keras")    # top-level model file
    os.symlink(root / "m" / "1", root / "m" / "3")       # inside: served
    found = scan(str(root))
    assert {n: sorted(v) for n, v in found.models.items()} == {"m": [1, 3]}
    for entry in ("m/2", "far", "x.keras"):
        assert "outside the model directory" in found.skipped[str(root / entry)]
    followed = scan(str(root), follow_symlinks=True)
    assert {n: sorted(v) for n, v in followed.models.items()} == {"m": [1, 2, 3], "x": [1]}


def test_corrupt_and_linked_model_files_say_what_is_wrong(tmp_path):
    (tmp_path / "bad.keras").write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match="bad.keras: not a Keras archive.*17 bytes"):
        load_model(str(tmp_path / "bad.keras"))
    (tmp_path / "notes.txt").write_text("hello\n")
    os.symlink(tmp_path / "notes.txt", tmp_path / "link.keras")
    with pytest.raises(ModelLoadError, match="link.keras: not a Keras archive"):
        load_model(str(tmp_path / "link.keras"))
    import zipfile

    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as z:
        z.writestr("readme", "no config")
    with pytest.raises(ModelLoadError, match="empty.keras: cannot be loaded as a Keras model.*config.json"):
        load_model(str(tmp_path / "empty.keras"))


def test_model_files_outside_confine_to_are_refused(tmp_path, h5_file):
    os.makedirs(tmp_path / "root" / "1")
    os.symlink(h5_file, tmp_path / "root" / "1" / "model.h5")
    with pytest.raises(ModelLoadError, match="1/model.h5 resolves outside the model directory.*--follow-symlinks"):
        load_model(str(tmp_path / "root" / "1"), trust_model_code=True, confine_to=str(tmp_path / "root"))
    fn = load_model(str(tmp_path / "root" / "1"), trust_model_code=True)
    assert [s.name for s in fn.outputs] == ["y"]


def _tiny(path):
    inputs = keras.Input((2,), name="x")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keras.Model(inputs, keras.layers.Dense(1)(inputs)).save(str(path))


def test_one_unreadable_model_folder_stops_nothing(tmp_path, monkeypatch):
    """Another model still loads, and the unreadable one keeps its loaded version."""
    from gradserve.server.models import repository

    _tiny(tmp_path / "a" / "1" / "m.keras")
    cfg = ServerConfig(model_dir=str(tmp_path), engine=EngineConfig(xla="off", warmup=False))
    repo = ModelRepository(cfg, Compiler(cfg.engine))
    repo.load_configured()
    _tiny(tmp_path / "b" / "1" / "m.keras")
    listdir = os.listdir

    def failing(path):
        if os.path.basename(str(path)) == "a":
            raise PermissionError(13, "Permission denied")
        return listdir(path)

    monkeypatch.setattr(repository.os, "listdir", failing)
    repo.poll_once(initial=True)
    assert [v.state.name for v in repo.versions("a")] == ["READY"]
    assert [v.state.name for v in repo.versions("b")] == ["READY"]


def test_an_error_on_one_version_is_logged_with_its_traceback(tmp_path, monkeypatch, caplog):
    from gradserve.server.models import repository

    for name in ("a", "b"):
        _tiny(tmp_path / name / "1" / "m.keras")
    fingerprint = repository._fingerprint

    def failing(path):
        if os.sep + "a" + os.sep in path:
            raise RuntimeError("injected scan failure")
        return fingerprint(path)

    monkeypatch.setattr(repository, "_fingerprint", failing)
    cfg = ServerConfig(model_dir=str(tmp_path), engine=EngineConfig(xla="off", warmup=False))
    repo = ModelRepository(cfg, Compiler(cfg.engine))
    with caplog.at_level("ERROR", logger="gradserve.server"):
        repo.load_configured()
    assert repo.names() == ["b"] and [v.state.name for v in repo.versions("b")] == ["READY"]
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "model a version 1" in record.getMessage() and "injected scan failure" in str(record.exc_info[1])
