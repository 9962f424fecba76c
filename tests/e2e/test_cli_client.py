"""The client subcommands as subprocesses against a live server: ``gradserve models`` and
``gradserve gradient`` round-tripping .npy, .npz and CSV, streaming with a progress bar, and PNG plots."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def gradserve(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "gradserve", *args], env=ENV,
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_client_commands_never_import_tensorflow():
    code = ("import sys; from gradserve.server.process import cli; cli.build_parser(); "
            "import gradserve._cli; assert 'tensorflow' not in sys.modules, 'tf imported'")
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, timeout=60)


@pytest.mark.parametrize("command", ["models", "gradient", "sensitivity", "shap", "pdp"])
def test_every_client_subcommand_has_help_with_examples(command):
    out = gradserve(command, "--help").stdout
    assert "examples:" in out and f"gradserve {command}" in out


def test_models_lists_the_demo_models(demo_server):
    table = gradserve("models", "--target", demo_server.address).stdout
    assert any(line.startswith("dense2\tv1\tREADY") for line in table.splitlines())
    listed = json.loads(gradserve("models", "--target", demo_server.address, "--json").stdout)
    dense2 = next(m for m in listed if m["name"] == "dense2")
    assert dense2["versions"][0]["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 4]}]


def test_gradient_npy_round_trip(demo_server, tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (6, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    gradserve("gradient", "dense2", "--target", demo_server.address, "--input", str(tmp_path / "x.npy"),
              "-o", str(tmp_path / "g.npy"))
    g = np.load(tmp_path / "g.npy")
    assert g.shape == x.shape
    np.testing.assert_allclose(g, 0.5, rtol=1e-6)


def test_gradient_npz_round_trip_by_input_name_with_outputs(demo_server, client, tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 3)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)
    np.savez(tmp_path / "ab.npz", a=a, b=b)
    gradserve("gradient", "multi", "--target", demo_server.address, "--input", str(tmp_path / "ab.npz"),
              "--head", "y1", "--with-outputs", "-o", str(tmp_path / "g.npz"))
    want_y, want = client.gradient("multi", {"a": a, "b": b}, output="y1", return_outputs=True)
    with np.load(tmp_path / "g.npz") as got:
        assert set(got.files) == {"a", "b", "outputs/y1", "outputs/y2"}
        np.testing.assert_allclose(got["a"], want["a"], rtol=1e-6)
        np.testing.assert_allclose(got["b"], want["b"], rtol=1e-6)
        np.testing.assert_allclose(got["outputs/y1"], want_y["y1"], rtol=1e-6)


def test_gradient_csv_round_trip_keeps_the_header_and_plots_a_bar_chart(demo_server, tmp_path):
    x = np.random.default_rng(2).uniform(0, 1, (5, 4))
    np.savetxt(tmp_path / "rows.csv", x, delimiter=",", header="S,K,T,r", comments="")
    gradserve("gradient", "dense2", "--target", demo_server.address, "--input", str(tmp_path / "rows.csv"),
              "-o", str(tmp_path / "g.csv"), "--plot", str(tmp_path / "bars.png"))
    lines = (tmp_path / "g.csv").read_text().splitlines()
    assert lines[0] == "S,K,T,r"
    g = np.loadtxt(tmp_path / "g.csv", delimiter=",", skiprows=1)
    assert g.shape == (5, 4)
    np.testing.assert_allclose(g, 0.5, rtol=1e-6)
    assert png_size(str(tmp_path / "bars.png")) == (600, 400)


def test_image_attributions_are_plotted_as_a_heatmap(demo_server, client, tmp_path):
    images = np.random.default_rng(3).uniform(0, 1, (2, 16, 16, 1)).astype(np.float32)
    np.save(tmp_path / "img.npy", images)
    gradserve("gradient", "cnn", "--target", demo_server.address, "--input", str(tmp_path / "img.npy"),
              "--method", "integrated_gradients", "--steps", "16", "--index", "argmax",
              "-o", str(tmp_path / "ig.npy"), "--plot", str(tmp_path / "saliency.png"), "--plot-example", "1")
    want = client.integrated_gradients("cnn", images, steps=16, target="argmax")
    np.testing.assert_allclose(np.load(tmp_path / "ig.npy"), want, rtol=1e-5, atol=1e-7)
    assert png_size(str(tmp_path / "saliency.png")) == (600, 400)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(tmp_path / "saliency.png"))
    assert pixels.shape[:2] == (400, 600) and pixels[..., :3].std() > 0.05  # not a blank canvas


def test_batch_size_streams_with_a_progress_bar(demo_server, tmp_path):
    x = np.random.default_rng(4).uniform(-1, 1, (50, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = gradserve("gradient", "dense2", "--target", demo_server.address, "--input", str(tmp_path / "x.npy"),
                     "--method", "predict", "--batch-size", "7", "-o", str(tmp_path / "y.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy")[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5)
    assert "8/8" in proc.stderr   # tqdm's counter: ceil(50 / 7) batches


def test_errors_are_one_line_with_exit_status_2(demo_server, tmp_path):
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    missing = gradserve("gradient", "nope", "--target", demo_server.address, "--input", str(tmp_path / "x.npy"),
                        check=False)
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr and "Traceback" not in missing.stderr
    bad = gradserve("gradient", "dense2", "--target", demo_server.address, "--input", str(tmp_path / "x.txt"),
                    check=False)
    assert bad.returncode == 2 and "--input" in bad.stderr
    many = gradserve("gradient", "multi", "--target", demo_server.address, "--input", str(tmp_path / "x.npy"),
                     check=False)
    assert many.returncode == 2 and "INVALID_ARGUMENT" in many.stderr


def test_plot_without_matplotlib_says_which_extra_to_install(demo_server, tmp_path):
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    code = ("import sys; sys.modules['matplotlib'] = None; from gradserve.server.process import cli; "
            f"sys.exit(cli.main(['gradient', 'dense2', '--target', {demo_server.address!r}, "
            f"'--input', {str(tmp_path / 'x.npy')!r}, '--plot', {str(tmp_path / 'p.png')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "gradserve[viz]" in proc.stderr
    assert not (tmp_path / "p.png").exists()
