"""Regenerate client/v1/*_pb2*.py from protos/ (run after editing a .proto).

The generated modules are committed; tests/unit/test_generated.py regenerates them into a
temporary folder and fails on any difference, so they can never drift from protos/.
"""
from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "client" / "v1"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc on every proto under protos/gradserve/v1, writing modules into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"  # protoc's own well-known types
    sources = sorted((PROTOS / "gradserve" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTOS}", f"-I{include}",
                f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        if protoc.main(args + [str(s) for s in sources]) != 0:
            raise RuntimeError("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((pathlib.Path(tmp) / "gradserve" / "v1").iterdir()):
            if f.name == "tensor_pb2_grpc.py":  # tensor.proto has no service
                continue
            shutil.copy(f, out_dir / f.name)
            written.append(out_dir / f.name)
        return written


if __name__ == "__main__":
    for path in generate(TARGET):
        print(path.relative_to(ROOT), file=sys.stderr)
