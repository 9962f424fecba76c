"""Helpers for tests that run `gradserve serve` as a subprocess: free ports, waiting on a
condition, and the server process itself (started, SERVING, stopped with SIGTERM, log closed).

Importable from every test module (pyproject.toml puts tests/ on pytest's pythonpath). Tests wait
on conditions with ``wait_for``, never on fixed sleeps: the bound is a bound on a hang, not a
timing check, so it stays generous for a busy machine.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["free_port", "wait_for", "wait_serving", "serve_env", "ServeProcess", "pid_gone"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (for servers that need it up front)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 120.0, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something true (returned), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_serving(address: str, proc: subprocess.Popen[Any], timeout: float = 180.0) -> None:
    """Poll the health service until the server reports SERVING (its models are loaded)."""
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)

        def serving() -> bool:
            assert proc.poll() is None, f"server exited early with code {proc.returncode}"
            try:
                return bool(stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                            == health_pb2.HealthCheckResponse.SERVING)
            except grpc.RpcError:
                return False

        wait_for(serving, f"server at {address} to report SERVING", timeout, interval=0.2)


def serve_env(**extra: str) -> dict[str, str]:
    """The environment of a test server: no GPU probing, TensorFlow's C++ logs quiet."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", **extra)


def pid_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        return True


class ServeProcess:
    """``gradserve serve ARGS`` as a subprocess, its stdout and stderr in ``log_path``.

    ``--host`` and ``--port`` are added (a free port unless ``port`` is given); ``executable``
    replaces ``python -m gradserve`` (an installed ``gradserve`` script). Use it as a
    context manager: leaving it kills a server still running and closes the log::

        with ServeProcess(tmp_path / "server.log", "--xla", "off") as server:
            server.wait_serving()
            ...
            assert server.terminate() == 0
        assert "listening on" in server.log_text()
    """

    def __init__(self, log_path: Path, *args: str, host: str = "127.0.0.1", port: int | None = None,
                 env: Mapping[str, str] | None = None, executable: Sequence[str] | None = None,
                 cwd: Path | None = None) -> None:
        self.host = host
        self.port = free_port(host) if port is None else port
        self.log_path = Path(log_path)
        self.args = list(args)
        self.env = dict(env) if env is not None else serve_env()
        self.command = [*(executable or [sys.executable, "-m", "gradserve"]), "serve", "--host", host,
                        "--port", str(self.port), *self.args]
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "ServeProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd)
        return self

    def wait_serving(self, timeout: float = 300.0) -> "ServeProcess":
        assert self.proc is not None
        wait_serving(self.address, self.proc, timeout)
        return self

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM, then the exit code (waits at most ``timeout`` seconds)."""
        self.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        """Kill the server if it still runs, reap it and close its log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(60)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
