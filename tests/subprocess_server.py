"""Helpers for tests that run `gradserve serve` as a subprocess: free ports and readiness.

Importable from every test module (pyproject.toml puts tests/ on pytest's pythonpath).
"""
from __future__ import annotations

import socket
import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["free_port", "wait_serving"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that need it up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(address: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:  # type: ignore[type-arg]
    """Poll the health service until the server reports SERVING (its models are loaded)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert proc.poll() is None, "server exited early"
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"server at {address} did not become SERVING within {timeout:.0f} s")
