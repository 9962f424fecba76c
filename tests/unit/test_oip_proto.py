"""The vendored Open Inference Protocol proto: generated code in sync, wire-compatible with the
messages of tritonclient (and KServe, where installed): same names, numbers, types and labels."""
from __future__ import annotations

import importlib.util
import pathlib
import runpy
import subprocess
import sys
import tempfile
from typing import Any, Iterator

import pytest
from google.protobuf import descriptor_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]
GENERATED = ROOT / "server" / "gradserve" / "server" / "frontends" / "oip" / "_proto.py"


def _ours() -> descriptor_pb2.FileDescriptorProto:
    # Read without importing gradserve.server.frontends.oip (which imports the server and TensorFlow).
    return descriptor_pb2.FileDescriptorProto.FromString(runpy.run_path(str(GENERATED))["FILE_DESCRIPTOR"])


def _messages(prefix: str, messages: Any) -> Iterator[tuple[str, Any]]:
    for message in messages:
        name = f"{prefix}{message.name}"
        yield name, message
        yield from _messages(f"{name}.", message.nested_type)


def _fields(file: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[int, tuple[str, int, int, str]]]:
    return {name: {f.number: (f.name, f.type, f.label, f.type_name.rsplit(".", 1)[-1]) for f in message.field}
            for name, message in _messages("", file.message_type) if not message.options.map_entry}


def _assert_compatible(theirs: descriptor_pb2.FileDescriptorProto, subset: bool, skip: str = "-") -> None:
    """Every message of ours exists in ``theirs`` with the same fields (``subset``: theirs may lack
    some; ``skip``: a name prefix of messages not compared)."""
    mine, other = _fields(_ours()), _fields(theirs)
    for name, fields in mine.items():
        if name.startswith(skip):
            continue
        assert name in other, name
        for number, field in fields.items():
            if subset and number not in other[name]:
                continue
            assert other[name].get(number) == field, (name, number)
    their_rpcs = {m.name: (m.input_type, m.output_type) for m in theirs.service[0].method}
    for method in _ours().service[0].method:
        if method.name in their_rpcs and not method.name.startswith(skip):
            assert their_rpcs[method.name] == (method.input_type, method.output_type), method.name


def test_generated_module_matches_the_proto(generator_path: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import pathlib, sys; sys.path[:0] = sys.argv[1:3]; import gen_protos; "
                "gen_protos.generate_oip(pathlib.Path(sys.argv[3]))")
        out = pathlib.Path(tmp) / "_proto.py"
        proc = subprocess.run([sys.executable, "-c", code, *generator_path, str(out)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == GENERATED.read_bytes(), f"{GENERATED} differs; run tools/gen_protos.py"


def test_package_and_service_are_the_specifications() -> None:
    ours = _ours()
    assert ours.package == "inference" and [s.name for s in ours.service] == ["GRPCInferenceService"]
    assert {m.name for m in ours.service[0].method} >= {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                        "ModelMetadata", "ModelInfer", "SystemSharedMemoryStatus",
                                                        "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister"}


def test_wire_compatible_with_tritonclient() -> None:
    import tritonclient.grpc.service_pb2 as service_pb2
    theirs = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(theirs)
    # Triton's repository RPCs differ from KServe's (gradserve serves neither).
    _assert_compatible(theirs, subset=False, skip="Repository")


@pytest.mark.skipif(importlib.util.find_spec("kserve") is None, reason="kserve is not installed")
def test_wire_compatible_with_kserve() -> None:
    # In a fresh interpreter: kserve's messages clash with tritonclient's in the default pool.
    code = ("import sys; from google.protobuf import descriptor_pb2; "
            "from kserve.protocol.grpc import grpc_predict_v2_pb2 as k; f = descriptor_pb2.FileDescriptorProto(); "
            "k.DESCRIPTOR.CopyToProto(f); sys.stdout.buffer.write(f.SerializeToString())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    theirs = descriptor_pb2.FileDescriptorProto.FromString(proc.stdout)
    # InferParameter: KServe lacks Triton's double/uint64 fields; and Triton's shared-memory extension.
    _assert_compatible(theirs, subset=True, skip="SystemSharedMemory")
