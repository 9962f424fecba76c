"""Packaging contracts: the SDK never imports TensorFlow, and generated code matches protos/."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_import_gradserve_does_not_import_tensorflow():
    code = ("import sys, gradserve, gradserve.v1.sensitivity_service_pb2_grpc; "
            "c = gradserve.Client('127.0.0.1:1'); c.close(); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generated_code_matches_protos(generator_path: list[str]) -> None:
    # protoc runs in a fresh interpreter: in-process it can clash with TensorFlow's protobuf.
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import pathlib, sys; sys.path[:0] = sys.argv[1:3]; import gen_protos; "
                "print('\\n'.join(str(p) for p in gen_protos.generate(pathlib.Path(sys.argv[3]))))")
        proc = subprocess.run([sys.executable, "-c", code, *generator_path, tmp],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        written = [pathlib.Path(line) for line in proc.stdout.split()]
        assert written
        for path in written:
            committed = ROOT / "client" / "gradserve" / "v1" / path.name
            assert committed.exists(), f"{path.name} is not committed; run tools/gen_protos.py"
            assert committed.read_bytes() == path.read_bytes(), \
                f"client/gradserve/v1/{path.name} differs from protos/; run tools/gen_protos.py"
        generated = {p.name for p in written}
        committed_names = {p.name for p in (ROOT / "client" / "gradserve" / "v1").glob("*_pb2*")}
        assert committed_names == generated
