"""Byte-level fuzzing of every RPC against a `gradserve serve` subprocess (hypothesis).

``test_fuzz.py`` builds its requests as protobuf objects, so every request it sends parses; an
attacker sends bytes. Here each RPC gets arbitrary bytes and mutations of valid serialized
requests (bit flips, truncations, insertions, deletions, huge or unterminated varints, lengths
running past the end, invalid wire types, deep nesting, splices of two messages), sent raw
through identity serializers: at least ``MIN_INPUTS`` inputs a run, concurrently. Whatever the
bytes, the answer is a result or a status of the error model, never UNKNOWN or INTERNAL; a
ComputeStream answers each message in-band or ends with such a status; afterwards the server
reports SERVING, computes a correct gradient, logged no traceback, and its resident memory grew
by less than ``RSS_GROWTH_BOUND``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc.service_pb2 as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gradserve import _codec
from gradserve.v1 import global_sensitivity_service_pb2 as gpb
from gradserve.v1 import model_service_pb2 as mpb
from gradserve.v1 import sensitivity_service_pb2 as pb
from subprocess_server import free_port, wait_serving

COMPUTE = "/gradserve.v1.SensitivityService/Compute"
STREAM = "/gradserve.v1.SensitivityService/ComputeStream"
LIST = "/gradserve.v1.ModelService/ListModels"
GET = "/gradserve.v1.ModelService/GetModel"
ANALYZE = "/gradserve.v1.GlobalSensitivityService/Analyze"
OIP = "/inference.GRPCInferenceService/"
#: Inputs sent per run, at least (all RPCs together).
MIN_INPUTS = 5000
PER_EXAMPLE = 50
#: Growth of the server's resident memory over the whole run that counts as a leak.
RSS_GROWTH_BOUND = 512 * 1024 * 1024
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FORBIDDEN_VALUES = {code.value[0] for code in FORBIDDEN}
#: Small limits: a mutated request that happens to be valid stays cheap to compute.
SERVER_FLAGS = ["--max-batch", "64", "--max-elements", "4096", "--max-steps", "16", "--max-samples", "16",
                "--max-gsa-evaluations", "2048", "--max-gsa-dimension", "8", "--max-deadline", "20"]


def _identity(b: bytes) -> bytes:
    return b


def _compute_request(model: str = "dense2", method: int = pb.METHOD_GRADIENT) -> pb.ComputeRequest:
    req = pb.ComputeRequest(model=model, method=method, request_id="fuzz", include_outputs=True)
    _codec.encode(np.arange(8, dtype=np.float32).reshape(2, 4), out=req.inputs["input"])
    return req


def _seeds() -> dict[str, list[bytes]]:
    """Valid serialized requests of each RPC, to mutate."""
    multi = pb.ComputeRequest(model="multi", method=pb.METHOD_GRADIENT)
    _codec.encode(np.ones((2, 3), np.float32), out=multi.inputs["a"])
    _codec.encode(np.ones((2, 2), np.float32), out=multi.inputs["b"])
    compute = [_compute_request(), _compute_request(method=pb.METHOD_INTEGRATED_GRADIENTS),
               _compute_request(method=pb.METHOD_JACOBIAN), multi]
    analyze = gpb.AnalyzeRequest(model="dense2", method=gpb.ANALYSIS_METHOD_SOBOL, samples=8, seed=1,
                                 factors=[gpb.Factor(name=f"x{i}", input="input", index=i,
                                                     distribution=gpb.DISTRIBUTION_UNIFORM, params=[0.0, 1.0])
                                          for i in range(4)])
    infer = triton.ModelInferRequest(model_name="dense2", id="fuzz")
    inp = infer.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    inp.contents.fp32_contents.extend(range(8))
    infer.parameters["method"].string_param = "gradient"
    raw = triton.ModelInferRequest(model_name="dense2")
    raw.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    raw.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    return {
        COMPUTE: [r.SerializeToString() for r in compute],
        STREAM: [pb.ComputeStreamRequest(request=r).SerializeToString() for r in compute],
        LIST: [mpb.ListModelsRequest().SerializeToString(), b""],
        GET: [mpb.GetModelRequest(name=n).SerializeToString() for n in ("dense2", "cnn", "")],
        ANALYZE: [analyze.SerializeToString()],
        OIP + "ServerLive": [b""],
        OIP + "ServerReady": [b""],
        OIP + "ModelReady": [triton.ModelReadyRequest(name="dense2").SerializeToString()],
        OIP + "ServerMetadata": [b""],
        OIP + "ModelMetadata": [triton.ModelMetadataRequest(name="dense2", version="1").SerializeToString()],
        OIP + "ModelInfer": [infer.SerializeToString(), raw.SerializeToString()],
    }


SEEDS = _seeds()
ALL_SEEDS = [s for seeds in SEEDS.values() for s in seeds if s]
#: Varints a parser must refuse or bound: 2**64-1, unterminated, overlong, 2**32-1 as a length.
VARINTS = [b"\xff" * 9 + b"\x01", b"\x80" * 10, b"\x80" * 11 + b"\x00", b"\xff\xff\xff\xff\x0f",
           b"\xff\xff\xff\xff\x07"]
#: Tags: wire types 3/4 (groups, unbalanced), 6/7 (invalid), field number 0, a huge field number.
TAGS = [b"\x0b", b"\x0c", b"\x0e", b"\x0f", b"\x02\x00", b"\x00", b"\xf8\xff\xff\xff\x0f\x01"]


@st.composite
def mutations(draw: Any, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "varint", "tag", "length", "nest",
                                   "splice"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "varint":
            data[at:at] = draw(st.sampled_from(VARINTS))
        elif op == "tag":
            data[at:at] = draw(st.sampled_from(TAGS))
        elif op == "length" and data:
            # A length prefix (or any byte) made to run on or past the end.
            data[min(at, len(data) - 1)] = draw(st.sampled_from([0x7F, 0x80, 0xFF]))
        elif op == "nest":
            # The message wrapped in itself as field 1 over and over: past protobuf's recursion limit.
            for _ in range(draw(st.sampled_from([2, 50, 101, 200]))):
                body = bytes(data)
                data = bytearray(b"\x0a" + _varint(len(body)) + body)
        elif op == "splice":
            other = draw(st.sampled_from(ALL_SEEDS))
            data[at:] = other[draw(st.integers(0, len(other))):]
    return bytes(data[:65536])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def payloads(path: str) -> st.SearchStrategy[bytes]:
    seeds = SEEDS[path]
    return st.one_of(st.binary(max_size=256), st.sampled_from(seeds).flatmap(mutations),
                     st.sampled_from(ALL_SEEDS).flatmap(mutations), st.sampled_from(seeds))


@st.composite
def inputs(draw: Any) -> tuple[str, list[bytes]]:
    """One RPC and what it is sent: one message, or 1-4 messages for ComputeStream."""
    path = draw(st.sampled_from(sorted(SEEDS)))
    count = draw(st.integers(1, 4)) if path == STREAM else 1
    return path, [draw(payloads(path)) for _ in range(count)]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("fuzz_bytes") / "server.log"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--port", str(port),
                                 *SERVER_FLAGS], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, proc)
        yield address, proc, log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Outcomes:
    """What the server answered, counted by RPC and status (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = 0
        self.bad: list[str] = []
        self.codes: dict[tuple[str, str], int] = {}

    def add(self, path: str, code: str, sent: int, problem: str | None = None) -> str | None:
        with self.lock:
            self.sent += sent
            self.codes[(path, code)] = self.codes.get((path, code), 0) + 1
            if problem is not None and len(self.bad) < 20:
                self.bad.append(problem)
        return problem


def _send(channel: grpc.Channel, path: str, messages: list[bytes], out: Outcomes) -> str | None:
    """Send one input; record its status; returns what breaks the error model, if anything."""
    shown = repr(messages)[:300]
    try:
        if path == STREAM:
            call = channel.stream_stream(path, request_serializer=_identity, response_deserializer=_identity)
            answers = [pb.ComputeStreamResponse.FromString(a) for a in call(iter(messages), timeout=30)]
            # The stream ended OK: every message was answered, in-band errors inside the error model.
            if len(answers) != len(messages):
                return out.add(path, "OK", len(messages), f"{path}: {len(answers)} answers to {len(messages)}: {shown}")
            for a in answers:
                if a.WhichOneof("result") == "error" and a.error.code in FORBIDDEN_VALUES:
                    return out.add(path, "OK", len(messages),
                                   f"{path}: in-band {a.error.code} {a.error.message!r}: {shown}")
        elif path == ANALYZE:
            call = channel.unary_stream(path, request_serializer=_identity, response_deserializer=_identity)
            for _ in call(messages[0], timeout=30):
                pass
        else:
            channel.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)(
                messages[0], timeout=30)
        return out.add(path, "OK", len(messages))
    except grpc.RpcError as err:
        code = err.code()
        problem = f"{path}: {code.name} {err.details()!r}: {shown}" if code in FORBIDDEN else None
        return out.add(path, code.name, len(messages), problem)


@pytest.mark.slow
def test_raw_bytes_on_every_rpc(server: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    address, proc, log_path = server
    warm, out = Outcomes(), Outcomes()
    with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(16) as pool:
        for path, seeds in SEEDS.items():  # every seed once, so that RSS is measured warm
            for seed in seeds:
                _send(channel, path, [seed], warm)
        assert not warm.bad, "\n".join(warm.bad)
        rss_before = _rss(proc.pid)

        # No shrinking: each example is 50 concurrent RPCs, and the failures are listed as sent.
        @settings(max_examples=MIN_INPUTS // PER_EXAMPLE + 10, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.lists(inputs(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
        def fuzz(batch: list[tuple[str, list[bytes]]]) -> None:
            problems = [f.result() for f in [pool.submit(_send, channel, path, messages, out)
                                             for path, messages in batch]]
            assert not any(problems), "\n".join(p for p in problems if p)

        fuzz()
        assert out.sent >= MIN_INPUTS
        assert {path for path, _ in out.codes} == set(SEEDS)  # every RPC was fuzzed
        assert not out.bad, "\n".join(out.bad)
        # Still healthy: SERVING, a correct gradient, memory bounded, no traceback in the log.
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        answer = channel.unary_unary(COMPUTE, request_serializer=pb.ComputeRequest.SerializeToString,
                                     response_deserializer=pb.ComputeResponse.FromString)(_compute_request(),
                                                                                          timeout=30)
        np.testing.assert_allclose(_codec.decode(answer.attributions["input"]), np.full((2, 4), 0.5), rtol=1e-6)
        growth = _rss(proc.pid) - rss_before
        assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.0f} MiB over {out.sent} inputs"
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
    assert proc.poll() is None
