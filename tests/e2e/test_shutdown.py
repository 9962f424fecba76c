"""Graceful shutdown of `gradserve serve`: SIGTERM under load -> health NOT_SERVING -> every
accepted request is answered -> exit code 0."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve import _codec
from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(address: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert proc.poll() is None, "server exited early"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError("server did not become SERVING")


def _load(address: str, proc: subprocess.Popen, ok: list[int], failures: list[Any], refused: list[int],
          started: threading.Event) -> None:
    """Send gradient requests until the server is gone; sort every outcome."""
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    req = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT)
    _codec.encode(x, out=req.inputs["input"])
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SensitivityServiceStub(ch)
        while True:
            try:
                resp = stub.Compute(req, timeout=60)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    # Not accepted: the server had stopped taking calls (or was gone).
                    refused.append(1)
                    if proc.poll() is not None or len(refused) > 200:
                        return
                    time.sleep(0.01)
                    continue
                failures.append((err.code(), err.details()))
                return
            g = _codec.decode(resp.attributions["input"])
            if not np.allclose(g, 0.5):
                failures.append(("wrong answer", g))
                return
            ok.append(1)
            if len(ok) >= 200:
                started.set()


def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Any) -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "gradserve.server.cli", "serve", "--port", str(port),
                             "--xla", "off", "--grace-seconds", "20"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_serving(address, proc)
        with grpc.insecure_channel(address) as health_channel:
            watch = health_pb2_grpc.HealthStub(health_channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
            assert next(watch).status == SERVING

            ok: list[int] = []
            failures: list[Any] = []
            refused: list[int] = []
            started = threading.Event()
            threads = [threading.Thread(target=_load, args=(address, proc, ok, failures, refused, started))
                       for _ in range(4)]
            for t in threads:
                t.start()
            assert started.wait(120), f"load did not start: {failures}"
            before = len(ok)
            proc.send_signal(signal.SIGTERM)
            # Health turns NOT_SERVING first, while the server drains.
            assert next(watch).status == NOT_SERVING
            watch.cancel()  # an open Watch is itself in flight and would hold the drain
            assert proc.wait(timeout=90) == 0
            for t in threads:
                t.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert failures == []
    assert before >= 200 and len(ok) >= before
    log.seek(0)
    assert "shutting down" in log.read()
