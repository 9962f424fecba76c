"""`gradserve serve --workers 2`: a supervisor and two worker processes on one port.

One supervisor serves the whole module (starting TensorFlow twice is the slow part); the tests
run in file order: serving and health, aggregated metrics, model-dir polling in every worker,
a worker killed under load, then SIGTERM.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve._channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from subprocess_server import ServeProcess, free_port, serve_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                    reason="SO_REUSEPORT balancing and /proc are Linux's")]

GRACE_S = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        found[int(entry)] = (ppid, cmdline)
    return found


def _workers_of(pid: int) -> list[int]:
    return sorted(p for p, (ppid, cmd) in _processes().items() if ppid == pid and "--worker-index" in cmd)


def _listening_count(log: Path) -> int:
    return log.read_text(errors="replace").count("gradserve.server [-] listening on")


def _client(address: str, retries: int = 4) -> gradserve.Client:
    """An SDK client on a connection of its own. Channels of one process share connections to an
    address (gRPC's global subchannel pool); workers behind one port are balanced by connection."""
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES, False, retries) + [("grpc.use_local_subchannel_pool", 1)]
    return gradserve.Client(address, timeout=60, retries=retries,
                            channel=grpc.insecure_channel(address, options=options))


def _health(address: str, service: str = "") -> int:
    """Health status over a fresh channel (a new connection: the kernel picks a worker)."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                       timeout=10).status)


def _save_model(path: Path, weight: float) -> None:
    """A Keras model with output = weight * sum(x): its gradient is ``weight`` everywhere."""
    import keras

    inputs = keras.Input((4,), name="input")
    outputs = keras.layers.Dense(1, name="y", kernel_initializer=keras.initializers.Constant(weight),
                                 bias_initializer=keras.initializers.Constant(0.0))(inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, outputs).save(path)


class Supervised:
    def __init__(self, server: ServeProcess, metrics: str, model_dir: Path):
        self.server, self.metrics, self.model_dir = server, metrics, model_dir
        assert server.proc is not None
        self.proc, self.address, self.log = server.proc, server.address, server.log_path

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics, timeout=10) as resp:
            return str(resp.read().decode())


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: Any) -> Iterator[Supervised]:
    tmp = tmp_path_factory.mktemp("workers")
    model_dir = tmp / "models"
    _save_model(model_dir / "lin" / "1" / "model.keras", 0.5)
    metrics_port = free_port()
    server = ServeProcess(tmp / "server.log", "--workers", "2", "--metrics-port", str(metrics_port), "--xla", "off",
                          "--model-dir", str(model_dir), "--poll-seconds", "0.5", "--grace-seconds", str(GRACE_S))
    with server:
        workers: list[int] = []
        try:
            server.wait_serving()
            # Both workers are up once each has logged that it listens.
            wait_for(lambda: _listening_count(server.log_path) == 2, "both workers to listen", 300)
            workers = _workers_of(server.pid)
            yield Supervised(server, f"http://127.0.0.1:{metrics_port}/metrics", model_dir)
        finally:
            workers += _workers_of(server.pid)
            server.close()
            for pid in workers:   # normally gone with the supervisor (the parent-death signal)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_two_workers_serve_gradients_and_report_serving(supervised: Supervised) -> None:
    assert len(_workers_of(supervised.proc.pid)) == 2
    x = np.random.default_rng(0).random((8, 4), dtype=np.float32)
    for _ in range(8):   # fresh clients: new connections, spread over both workers
        with _client(supervised.address) as c:
            assert np.allclose(c.gradient("lin", x), 0.5)
            y = c.predict("lin", x)
            assert np.allclose(y[:, 0], 0.5 * x.sum(axis=1), atol=1e-5)
        assert _health(supervised.address) == SERVING
        assert _health(supervised.address, "lin") == SERVING


def _per_worker_counts(metrics_dir: str, pids: list[int], tmp: Path) -> dict[int, float]:
    """OK gradient requests of ``lin`` counted by each worker: its own counter file alone,
    aggregated by prometheus-client (the supervisor aggregates all of them)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    counts = {}
    for pid in pids:
        alone = tmp / str(pid)
        alone.mkdir(parents=True)
        shutil.copy(Path(metrics_dir) / f"counter_{pid}.db", alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        counts[pid] = _requests_ok(generate_latest(registry).decode())
    return counts


def _requests_ok(text: str) -> float:
    pattern = (r'^gradserve_requests_total\{(?=[^}]*model="lin")(?=[^}]*method="gradient")(?=[^}]*code="OK")'
               r'[^}]*\} (\S+)$')
    return sum(float(m) for m in re.findall(pattern, text, re.MULTILINE))


def test_metrics_of_both_workers_in_one_scrape(supervised: Supervised, tmp_path: Path) -> None:
    pids = _workers_of(supervised.proc.pid)
    environ = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
    metrics_dir = next(e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    before = _requests_ok(supervised.scrape())
    x = np.ones((2, 4), np.float32)
    calls = 0
    for attempt in range(64):   # new clients until both workers have served some calls
        with _client(supervised.address) as c:
            for _ in range(5):
                assert np.allclose(c.gradient("lin", x), 0.5)
                calls += 1
        if attempt >= 3 and all(n > 0 for n in _per_worker_counts(metrics_dir, pids, tmp_path / str(attempt)).values()):
            break
    per_worker = _per_worker_counts(metrics_dir, pids, tmp_path / "final")
    assert all(n > 0 for n in per_worker.values()), per_worker
    text = supervised.scrape()
    assert _requests_ok(text) - before == calls
    assert _requests_ok(text) == sum(per_worker.values())
    assert re.search(r'^gradserve_traces_total\{[^}]*model="lin"[^}]*\} [1-9]', text, re.MULTILINE), text
    assert re.search(r'^gradserve_inflight_rpcs\{[^}]*rpc="Compute"[^}]*\} 0\.0$', text, re.MULTILINE), text
    assert re.search(r"^gradserve_workers 2\.0$", text, re.MULTILINE), text


def test_model_dir_polling_in_every_worker(supervised: Supervised) -> None:
    tmp_version = supervised.model_dir / "quarter" / ".tmp-1"
    _save_model(tmp_version / "model.keras", 0.25)
    tmp_version.rename(supervised.model_dir / "quarter" / "1")
    x = np.ones((3, 4), np.float32)

    def every_connection_has_it() -> bool:
        for _ in range(16):   # 16 connections reach both workers but with odds of 2 in 65536
            with _client(supervised.address, retries=0) as c:
                try:
                    if not np.allclose(c.gradient("quarter", x), 0.25):
                        return False
                except (gradserve.NotFound, gradserve.Unavailable):
                    return False
        return True

    wait_for(every_connection_has_it, "model 'quarter' in both workers", 180)


def test_killed_worker_loses_no_call_and_is_restarted(supervised: Supervised) -> None:
    victim = _workers_of(supervised.proc.pid)[0]
    results: list[str] = []
    stop = threading.Event()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    def load() -> None:
        with _client(supervised.address) as c:
            while not stop.is_set():
                try:
                    g = c.gradient("lin", x)
                    results.append("OK" if np.allclose(g, 0.5) else f"wrong answer {g!r}")
                except gradserve.GradserveError as exc:
                    results.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 200, "200 calls before the kill")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: any(p != victim for p in _workers_of(supervised.proc.pid))
                 and len(_workers_of(supervised.proc.pid)) == 2, "a new worker process", 60)

        def replacement_listens() -> bool:
            # While the replacement loads, the port is served by the other worker only.
            assert _health(supervised.address) == SERVING
            assert supervised.proc.poll() is None
            return _listening_count(supervised.log) >= 3

        wait_for(replacement_listens, "the replacement worker to listen", 300, interval=0.5)
        settled = len(results)
        wait_for(lambda: len(results) >= settled + 200, "200 calls after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    text = supervised.log.read_text(errors="replace")
    assert f"(pid {victim}) killed by SIGKILL; restarting in" in text
    failed = [r for r in results if r != "OK"]
    assert failed == [] and len(results) >= 400
    assert victim not in _workers_of(supervised.proc.pid)
    assert re.search(r"^gradserve_worker_restarts_total 1\.0$", supervised.scrape(), re.MULTILINE)


def test_sigterm_drains_every_worker_and_exits_zero(supervised: Supervised) -> None:
    workers = _workers_of(supervised.proc.pid)
    assert len(workers) == 2
    supervised.proc.send_signal(signal.SIGTERM)
    assert supervised.proc.wait(timeout=GRACE_S + 60) == 0
    alive = {pid for pid in workers if pid in _processes()}
    assert alive == set()
    stragglers = [cmd for ppid, cmd in _processes().values() if f"--port {supervised.address.split(':')[1]}" in cmd]
    assert stragglers == []
    text = supervised.log.read_text(errors="replace")
    assert "SIGTERM, stopping 2 workers" in text and text.count("exited with code 0") == 2
    assert "every worker stopped" in text


def test_a_worker_with_a_configuration_error_stops_the_supervisor(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    out = subprocess.run([sys.executable, "-m", "gradserve", "serve", "--workers", "2", "--port", "0",
                          "--model-dir", str(tmp_path / "models"), "--tls-cert", str(tmp_path / "missing.pem"),
                          "--tls-key", str(tmp_path / "missing.key")],
                         env=serve_env(), capture_output=True, text=True, timeout=300)
    # Not restarted over and over: the first worker to fail stops the others, exit code 2.
    assert out.returncode == 2, out.stderr
    assert "cannot read" in out.stderr and "(configuration error); stopping" in out.stderr
    assert out.stderr.count("started (pid") == 2 and "restarting in" not in out.stderr
