"""Floods of the REST port, measured on a `gradserve serve --http-port` process.

What the server's resident memory and its gRPC health checks do while an attacker sends a flood
of header lines (without a token: the headers are bounded before authentication), a 40 MB JSON
body, or many large binary bodies at once. A thread polls health all the time and samples the
server's RSS; the bounds asserted are the issue's: RSS growth under a header flood below 100 MB,
health answered within 1 s at its slowest while a large body is decoded (the decoder yields
every 256 KiB, about 10 ms of work here, so a 1 s bound leaves two orders of magnitude for a
busy machine), and concurrent bodies held to the memory budget.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from subprocess_server import free_port, wait_serving

TOKEN = "flood-token"
BUDGET = 64 << 20
PATH = "/v2/models/dense2/infer"


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], grpc_port: int, http_port: int) -> None:
        self.proc, self.grpc_port, self.http_port = proc, grpc_port, http_port

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("rest_flood")
    (folder / "tokens").write_text(TOKEN + "\n")
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    with open(folder / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--port", str(grpc_port),
                                 "--http-port", str(http_port), "--auth-token-file", str(folder / "tokens"),
                                 "--max-inflight-request-bytes", str(BUDGET)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_serving(f"127.0.0.1:{grpc_port}", proc)
        srv = Server(proc, grpc_port, http_port)
        # Warm: a few ordinary requests, so that what is measured is the flood, not first use.
        for _ in range(3):
            with _connect(srv) as s:
                s.sendall(_post(_json_body(np.ones((2, 4), np.float32))))
                assert _status(s) == 200
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, -signal.SIGTERM):
            print((folder / "server.log").read_text()[-5000:])


class Watch:
    """Polls the server's gRPC health and samples its RSS until stopped: the slowest check and the peak."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.baseline = srv.rss()
        self.peak = self.baseline
        self.slowest = 0.0
        self.checks = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.srv.grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=30)   # connected before timing
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                except grpc.RpcError as err:
                    self.failures.append(str(err.code()))
                self.slowest = max(self.slowest, time.perf_counter() - start)
                self.checks += 1
                self.peak = max(self.peak, self.srv.rss())
                self._stop.wait(0.005)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def _connect(srv: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.http_port), timeout=120)


def _post(body: bytes, headers: bytes = b"") -> bytes:
    return (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + headers + b"\r\n" + body


def _json_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()


def _status(sock: socket.socket) -> int | None:
    """The status of the next response on ``sock``, None when it was closed without one."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return None
    return int(data.split(b" ", 2)[1])


def test_header_flood_is_refused_and_costs_no_memory(server: Server) -> None:
    """60 MB of tiny header lines, without a token: refused within the header limit, RSS flat."""
    with Watch(server) as watch, _connect(server) as s:
        s.sendall(b"GET /v2/models/dense2 HTTP/1.1\r\nHost: x\r\n")
        lines, sent = b"a:b\r\n" * 20000, 0
        try:
            while sent < 60 << 20:
                s.sendall(lines)
                sent += len(lines)
            s.sendall(b"\r\n")   # the head's end, had the server read it all
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _status(s) in (None, 431)
    assert sent < 60 << 20, "the whole flood was read"
    assert watch.growth < 100 << 20, f"RSS grew by {watch.growth / 2**20:.0f} MiB"
    assert not watch.failures and watch.slowest < 1.0, (watch.failures, watch.slowest)


def test_one_huge_header_value_is_refused(server: Server) -> None:
    with Watch(server) as watch, _connect(server) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < 30 << 20:
                s.sendall(b"v" * 65536)
                sent += 65536
            s.sendall(b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _status(s) in (None, 431)
    assert sent < 30 << 20, "the 30 MB header value was read"
    assert watch.growth < 100 << 20, f"RSS grew by {watch.growth / 2**20:.0f} MiB"


def test_a_40_mb_json_body_does_not_stall_the_server(server: Server) -> None:
    """Decoded in steps while health keeps answering; refused by validation (the batch is over
    --max-batch) after it, as in the issue; memory about the body and its array."""
    rows = (40 << 20) // (4 * 11)
    body = (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[%d,4],"data":[' % rows
            + b",".join([b"0.123456789"] * (rows * 4)) + b"]}]}")
    assert len(body) >= 40 << 20
    with Watch(server) as watch, _connect(server) as s:
        s.sendall(_post(body))
        del body
        assert _status(s) == 400
    assert not watch.failures and watch.checks > 10
    assert watch.slowest < 1.0, f"a health check took {watch.slowest:.3f} s"
    # The body (40 MB) and its values as FP32 (15 MB), and a few chunks of Python objects.
    assert watch.growth < 200 << 20, f"RSS grew by {watch.growth / 2**20:.0f} MiB"


def test_concurrent_binary_bodies_are_held_to_the_memory_budget(server: Server) -> None:
    """Eight 24 MB binary bodies at once against a 64 MiB budget: those past it are answered 429
    before their bodies are read, and the server holds about the budget, not 8 x 24 MB."""
    x = np.zeros((24 << 20) // 4, np.float32).reshape(-1, 4)
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    request = _post(header + x.tobytes(), f"Inference-Header-Content-Length: {len(header)}\r\n".encode())
    statuses: list[int | None] = []
    started = threading.Barrier(8)

    def send() -> None:
        with _connect(server) as s:
            try:
                s.sendall(request[:1 << 20])   # every request under way before any is complete
                started.wait(timeout=120)
                s.sendall(request[1 << 20:])
            except (BrokenPipeError, ConnectionResetError):
                pass
            statuses.append(_status(s))

    with Watch(server) as watch:
        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(statuses) == 8 and 429 in statuses, statuses
    assert set(statuses) <= {400, 429}, statuses   # 400: 1.5M rows is over --max-batch
    assert watch.growth < BUDGET + (100 << 20), f"RSS grew by {watch.growth / 2**20:.0f} MiB"
