"""Graceful shutdown of `gradserve serve`: SIGTERM under load -> health NOT_SERVING -> every
accepted request is answered -> exit code 0."""
from __future__ import annotations

import itertools
import json
import os
import signal
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
from subprocess_server import free_port, wait_serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _load(address: str, proc: subprocess.Popen, tag: str, outcomes: dict[str, str], ok: list[int],
          started: threading.Event) -> None:
    """Send gradient requests, each with its own request id, until the server is gone."""
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    req = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT)
    _codec.encode(x, out=req.inputs["input"])
    refused = 0
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SensitivityServiceStub(ch)
        for i in itertools.count():
            req.request_id = f"{tag}-{i}"
            try:
                resp = stub.Compute(req, timeout=60)
            except grpc.RpcError as err:
                outcomes[req.request_id] = err.code().name
                refused += 1
                if proc.poll() is not None or refused > 200:
                    return
                time.sleep(0.01)
                continue
            good = np.allclose(_codec.decode(resp.attributions["input"]), 0.5)
            outcomes[req.request_id] = "OK" if good else "wrong answer"
            ok.append(1)
            if len(ok) >= 200:
                started.set()


def _server_outcomes(log_text: str) -> dict[str, str]:
    """request id -> status code of every request the server's handler took, from its JSON log."""
    codes = {}
    for line in log_text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # not one of the server's log lines (e.g. TensorFlow's own stderr)
        if isinstance(record, dict) and record.get("logger") == "gradserve.server.requests":
            codes[record["request_id"]] = record["code"]
    return codes


def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Any, log_file: Any) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    log = log_file(tmp_path / "server.log")
    # DEBUG JSON logs: one line per request the server accepted, with its id and status.
    proc = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--port", str(port),
                             "--xla", "off", "--grace-seconds", "20", "--log-level", "DEBUG", "--log-format", "json"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    outcomes: dict[str, str] = {}
    try:
        wait_serving(address, proc)
        with grpc.insecure_channel(address) as health_channel:
            watch = health_pb2_grpc.HealthStub(health_channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
            assert next(watch).status == SERVING

            ok: list[int] = []
            started = threading.Event()
            threads = [threading.Thread(target=_load, args=(address, proc, f"t{i}", outcomes, ok, started))
                       for i in range(4)]
            for t in threads:
                t.start()
            assert started.wait(120), f"load did not start: {set(outcomes.values())}"
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
    log.seek(0)
    text = log.read()
    assert "shutting down" in text
    accepted = _server_outcomes(text)
    # Every request the server took was answered OK and reached its caller; the others were
    # refused before any handler ran (UNAVAILABLE, or CANCELLED by gRPC for calls that had
    # reached the transport but no handler when the server stopped taking calls).
    assert sum(v == "OK" for v in outcomes.values()) >= 200 and len(accepted) >= 200
    lost = {rid: (code, outcomes.get(rid)) for rid, code in accepted.items()
            if code != "OK" or outcomes.get(rid) != "OK"}
    assert lost == {}
    not_accepted = {rid: code for rid, code in outcomes.items() if rid not in accepted}
    assert set(not_accepted.values()) <= {"UNAVAILABLE", "CANCELLED"}, not_accepted
