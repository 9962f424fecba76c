"""Soak and abandoned clients against `gradserve serve` in a subprocess (so that its RSS and
threads can be read from /proc): 20,000 mixed requests (valid, invalid, cancelled in flight)
leave memory where warm-up left it and leak no thread, and a client killed mid-stream leaves no
handler behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.request
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradserve import _codec
from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc
from subprocess_server import ServeProcess, free_port, wait_for

pytestmark = pytest.mark.slow

SOAK_REQUESTS = 20_000
THREADS = 8
WINDOW = 32  # futures in flight per thread
#: Threads the server may add once and keep: its pools grow lazily up to their sizes (gRPC's timer
#: and executor threads, the event loop's default executor, TensorFlow's). A thread leaked per
#: request, per cancellation or per stream would add hundreds over the soak.
POOL_SLACK = 16


class ServerProcess:
    def __init__(self, server: ServeProcess, metrics_port: int) -> None:
        self.server = server
        self.proc = server.proc
        self.address = server.address
        self.metrics_port = metrics_port

    def status(self, field: str) -> int:
        """A number from /proc/PID/status, e.g. VmRSS (kB) or Threads."""
        with open(f"/proc/{self.server.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def inflight(self, rpc: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "gradserve_inflight_rpcs" and s.labels.get("rpc") == rpc:
                    return s.value
        return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    metrics_port = free_port()
    with ServeProcess(tmp_path_factory.mktemp("soak") / "server.log", "--xla", "off", "--metrics-port",
                      str(metrics_port), "--grace-seconds", "2") as proc:
        proc.wait_serving()
        yield ServerProcess(proc, metrics_port)
        assert proc.terminate(60) == 0


def _mixed_requests() -> list[tuple[str, pb.ComputeRequest]]:
    """(kind, request) templates: valid gradient/predict calls, invalid ones, and big ones
    cancelled at once ("cancel") or after WINDOW later calls were issued ("cancel-late")."""
    def req(model: str, x: np.ndarray, name: str, method: int = pb.METHOD_GRADIENT) -> pb.ComputeRequest:
        r = pb.ComputeRequest(model=model, method=method)
        _codec.encode(x, out=r.inputs[name])
        return r

    rng = np.random.default_rng(0)
    bad_shape = req("dense2", np.ones((2, 4), np.float32), "input")
    bad_shape.inputs["input"].shape[1] = 5
    return [
        ("valid", req("dense2", rng.normal(size=(4, 4)).astype(np.float32), "input")),
        ("valid", req("dense2", rng.normal(size=(1, 4)).astype(np.float32), "input", pb.METHOD_PREDICT)),
        ("valid", req("cnn", rng.normal(size=(2, 16, 16, 1)).astype(np.float32), "image")),
        ("valid", req("dense2", rng.normal(size=(16, 4)).astype(np.float32), "input", pb.METHOD_INPUT_X_GRADIENT)),
        ("invalid", bad_shape),
        ("invalid", pb.ComputeRequest(model="../etc/passwd")),
        ("invalid", req("nope", np.ones((1, 4), np.float32), "input")),
        ("cancel", req("cnn", rng.normal(size=(128, 16, 16, 1)).astype(np.float32), "image")),
        ("cancel-late", req("cnn", rng.normal(size=(128, 16, 16, 1)).astype(np.float32), "image")),
        ("invalid", req("dense2", np.ones((1, 4), np.float64), "input")),
    ]


def _drive(address: str, count: int, failures: list[Any], counts: dict[str, int], lock: threading.Lock) -> None:
    templates = _mixed_requests()
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SensitivityServiceStub(ch)
        pending: list[tuple[str, Any]] = []

        def settle(kind: str, fut: Any) -> None:
            if kind == "cancel-late":
                fut.cancel()  # issued WINDOW calls ago: in flight, queued or just finished
            try:
                resp = fut.result()
                outcome = "OK"
                if kind in ("invalid", "cancel"):
                    failures.append(("invalid request answered OK", resp.model))
            except grpc.FutureCancelledError:
                outcome = "CANCELLED"
            except grpc.RpcError as err:
                outcome = err.code().name
                expected = {"valid": set(), "invalid": {"INVALID_ARGUMENT", "NOT_FOUND"},
                            "cancel": {"CANCELLED"}, "cancel-late": {"CANCELLED"}}[kind]
                if outcome not in expected:
                    failures.append((kind, outcome, err.details()))
            with lock:
                counts[outcome] = counts.get(outcome, 0) + 1

        for i in range(count):
            kind, r = templates[i % len(templates)]
            fut = stub.Compute.future(r, timeout=120)
            if kind == "cancel":
                fut.cancel()
            pending.append((kind, fut))
            if len(pending) >= WINDOW:
                settle(*pending.pop(0))
        for kind, fut in pending:
            settle(kind, fut)


def _run_load(address: str, total: int) -> tuple[list[Any], dict[str, int]]:
    failures: list[Any] = []
    counts: dict[str, int] = {}
    lock = threading.Lock()
    threads = [threading.Thread(target=_drive, args=(address, total // THREADS, failures, counts, lock))
               for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures, counts


def _settled(server: ServerProcess, threads_at_most: int | None = None) -> tuple[int, int]:
    """RSS (kB) and thread count once the server is idle again: no call in flight and, when
    given, at most ``threads_at_most`` threads (threads finishing their last calls; bounded wait)."""
    def idle() -> bool:
        return (server.inflight("Compute") == 0 and server.inflight("ComputeStream") == 0
                and (threads_at_most is None or server.status("Threads") <= threads_at_most))

    wait_for(idle, f"the server to settle (threads now {server.status('Threads')})", timeout=60, interval=0.2)
    return server.status("VmRSS"), server.status("Threads")


def test_soak_mixed_requests_leave_memory_and_threads_at_baseline(server: ServerProcess) -> None:
    failures, _ = _run_load(server.address, 2_000)  # warm-up: every path traced and pooled once
    assert failures == []
    rss0, threads0 = _settled(server)
    failures, counts = _run_load(server.address, SOAK_REQUESTS)
    rss1, threads1 = _settled(server, threads0 + POOL_SLACK)
    print(f"soak: {counts}; RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MB; threads {threads0} -> {threads1}")
    assert failures == [], failures[:5]
    assert sum(counts.values()) == SOAK_REQUESTS
    assert counts.get("OK", 0) > 0 and counts.get("CANCELLED", 0) > 0 and counts.get("INVALID_ARGUMENT", 0) > 0
    assert rss1 - rss0 < 50 * 1024, f"RSS grew by {(rss1 - rss0) / 1024:.1f} MB"
    assert server.proc is not None and server.proc.poll() is None


_STREAMING_CLIENT = textwrap.dedent("""
    import sys, numpy as np, grpc
    from gradserve import _codec
    from gradserve.v1 import sensitivity_service_pb2 as pb, sensitivity_service_pb2_grpc as pb_grpc

    def requests():
        while True:
            r = pb.ComputeRequest(model="cnn", method=pb.METHOD_GRADIENT)
            _codec.encode(np.ones((64, 16, 16, 1), np.float32), out=r.inputs["image"])
            yield pb.ComputeStreamRequest(request=r)

    channel = grpc.insecure_channel(sys.argv[1])
    for i, response in enumerate(pb_grpc.SensitivityServiceStub(channel).ComputeStream(requests())):
        if i == 2:
            print("streaming", flush=True)
""")


def test_client_killed_mid_stream_leaves_no_handler(server: ServerProcess) -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    client = subprocess.Popen([sys.executable, "-c", _STREAMING_CLIENT, server.address],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "streaming"
        assert server.inflight("ComputeStream") == 1
        client.send_signal(signal.SIGKILL)
        client.wait(30)
        wait_for(lambda: server.inflight("ComputeStream") == 0, "the server to end the dead client's stream", 60)
    finally:
        if client.poll() is None:
            client.kill()
        client.wait(30)
        assert client.stdout is not None
        client.stdout.close()
    # The server is healthy and answers the next caller.
    with grpc.insecure_channel(server.address) as ch:
        r = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT)
        _codec.encode(np.ones((2, 4), np.float32), out=r.inputs["input"])
        resp = pb_grpc.SensitivityServiceStub(ch).Compute(r, timeout=60)
        np.testing.assert_allclose(_codec.decode(resp.attributions["input"]), 0.5, rtol=1e-6)
