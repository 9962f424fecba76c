"""The process supervisor of ``gradserve serve --workers N``: N worker processes on one port.

One Python process with one event loop serves at most about one core's worth of gRPC work.
``--workers N`` starts a supervisor that serves nothing itself: it starts N copies of the same
``gradserve serve`` command (with the hidden ``--worker-index``), each loading its own models and
binding the same ``host:port`` with ``SO_REUSEPORT``, so that the kernel spreads incoming
connections over them. The supervisor

- resolves the port once (``--port 0`` picks one free port that every worker then binds) and
  keeps a bound, never-listening socket on it, so the port stays reserved while workers restart;
- restarts a worker that exits, after an exponential backoff that resets once a worker has run
  for a while, logging its exit code or signal; a worker exiting with code 2 (a configuration
  error, e.g. an unreadable certificate) is not restarted: the supervisor stops the others and
  exits 2;
- on SIGTERM or SIGINT forwards SIGTERM to every worker, which drain within ``--grace-seconds``,
  SIGKILLs any still alive ``KILL_MARGIN_S`` later and exits 0 with no child left;
- serves ``/metrics`` on ``--metrics-port``, aggregating every worker's metrics with
  prometheus-client's multiprocess mode (workers write them to a private
  ``PROMETHEUS_MULTIPROC_DIR``), plus its own ``gradserve_workers`` and
  ``gradserve_worker_restarts_total``.

Workers bind the port only once their models are loaded (``cli``), so a restarted worker is
never handed a connection it cannot answer, and a worker whose supervisor disappeared shuts
itself down (``watch_parent``). This module never imports TensorFlow.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["RestartPolicy", "Supervisor", "worker_count", "watch_parent", "KILL_MARGIN_S", "CONFIG_ERROR_EXIT"]

_log = logging.getLogger("gradserve.server.process.supervisor")

#: Seconds after ``grace_seconds`` at which workers still alive are killed.
KILL_MARGIN_S = 5.0
#: Exit code of ``gradserve serve`` for a configuration error: such a worker is not restarted.
CONFIG_ERROR_EXIT = 2
_TICK_S = 0.1


def worker_count(text: str) -> int:
    """``--workers``: a positive integer, or ``auto`` for the cores this process may run on."""
    if text == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"expected a positive number of workers or 'auto', got {text!r}")
    return n


@dataclass(frozen=True)
class RestartPolicy:
    """When a worker that exited is started again."""

    #: Backoff before the first restart, in seconds; doubled for each further exit in a row.
    initial_backoff_s: float = 0.5
    #: Longest backoff, in seconds.
    max_backoff_s: float = 30.0
    #: A worker that ran this long before exiting starts again from ``initial_backoff_s``.
    reset_after_s: float = 60.0

    def backoff(self, failures: int) -> float:
        """Seconds to wait before restarting after ``failures`` (>= 1) exits in a row."""
        return float(min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** (failures - 1)))


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    pids: list[int] = field(default_factory=list)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) ``SO_REUSEPORT`` socket on ``host:port``; port 0 picks a free one.

    Workers bind the same port with ``SO_REUSEPORT``; this socket takes no connections (the
    kernel hands them to listening sockets only) and keeps the port ours while workers restart.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    """Runs ``workers`` copies of ``worker_command`` (plus the port and index) until stopped.

    Parameters
    ----------
    serve_argv
        The ``gradserve serve ...`` arguments the supervisor was started with (``serve``
        included); each worker runs them with ``--port``, ``--workers 1``, ``--metrics-port 0``
        and ``--worker-index`` appended (argparse keeps the last value of a flag).
    workers, host, port, grace_seconds, metrics_port
        As the flags of the same names.
    policy
        When exited workers are restarted.
    """

    def __init__(self, serve_argv: Sequence[str], *, workers: int, host: str, port: int, grace_seconds: float,
                 metrics_port: int = 0, policy: RestartPolicy = RestartPolicy()) -> None:
        self.serve_argv = list(serve_argv)
        self.host = host
        self.port = port
        self.grace_seconds = grace_seconds
        self.metrics_port = metrics_port
        self.policy = policy
        self._workers = [_Worker(i) for i in range(workers)]
        self._stopping = False
        self._exit_code = 0
        self._metrics_dir = ""
        self._http: Any = None
        self._restarts: Any = None
        self._live: Any = None

    # -- signals --------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a flag: the main loop notices it within one tick (no locks in a signal handler).
        if not self._stopping:
            _log.info("supervisor: %s, stopping %d workers (grace %.1fs)", signal.Signals(signum).name,
                      len(self._workers), self.grace_seconds)
        self._stopping = True

    # -- workers --------------------------------------------------------------------------------
    def _command(self, index: int) -> list[str]:
        return [sys.executable, "-m", "gradserve", *self.serve_argv, "--port", str(self.port),
                "--workers", "1", "--metrics-port", "0", "--worker-index", str(index)]

    def _spawn(self, w: _Worker) -> None:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self._metrics_dir)
        w.proc = subprocess.Popen(self._command(w.index), env=env)
        w.started_at = time.monotonic()
        w.restart_at = None
        w.pids.append(w.proc.pid)
        _log.info("supervisor: worker %d started (pid %d)", w.index, w.proc.pid)

    def _reap(self, w: _Worker, now: float) -> None:
        """Notice a worker that exited: log it and schedule its restart (or stop everything)."""
        assert w.proc is not None
        code = w.proc.poll()
        if code is None:
            return
        pid = w.proc.pid
        w.proc = None
        self._mark_dead(pid)
        if self._stopping:
            _log.info("supervisor: worker %d (pid %d) %s", w.index, pid, _describe_exit(code))
            return
        if code == CONFIG_ERROR_EXIT:
            _log.error("supervisor: worker %d (pid %d) exited with code %d (configuration error); stopping",
                       w.index, pid, code)
            self._exit_code = CONFIG_ERROR_EXIT
            self._stopping = True
            return
        w.failures = 1 if now - w.started_at >= self.policy.reset_after_s else w.failures + 1
        delay = self.policy.backoff(w.failures)
        w.restart_at = now + delay
        if self._restarts is not None:
            self._restarts.inc()
        _log.warning("supervisor: worker %d (pid %d) %s; restarting in %.1fs", w.index, pid,
                     _describe_exit(code), delay)

    def _alive(self) -> list[_Worker]:
        return [w for w in self._workers if w.proc is not None]

    def _drain(self) -> None:
        """SIGTERM every worker, wait up to grace + margin, SIGKILL the rest, reap them all."""
        for w in self._alive():
            assert w.proc is not None
            w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds + KILL_MARGIN_S
        while self._alive() and time.monotonic() < deadline:
            for w in self._alive():
                self._reap(w, time.monotonic())
            time.sleep(_TICK_S)
        for w in self._alive():
            assert w.proc is not None
            _log.warning("supervisor: worker %d (pid %d) still running %.1fs after SIGTERM; killing it",
                         w.index, w.proc.pid, self.grace_seconds + KILL_MARGIN_S)
            w.proc.kill()
            w.proc.wait()
            self._reap(w, time.monotonic())

    # -- metrics --------------------------------------------------------------------------------
    def _serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)
        self._restarts = Counter("gradserve_worker_restarts", "Workers restarted after they exited",
                                 registry=registry)
        self._live = Gauge("gradserve_workers", "Worker processes running", registry=registry)
        self._live.set_function(lambda: len(self._alive()))
        self._http, _ = start_http_server(self.metrics_port, addr=self.host, registry=registry)
        _log.info("supervisor: metrics of all workers on http://%s:%d/metrics", self.host,
                  self._http.server_port)

    def _mark_dead(self, pid: int) -> None:
        # Drops the live gauges (in-flight RPCs) of a dead worker; its counters keep counting.
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self._metrics_dir)

    # -- main loop ------------------------------------------------------------------------------
    def run(self) -> int:
        """Start the workers and supervise them until SIGTERM/SIGINT; returns the exit code."""
        # The metrics directory is ours (one per supervisor); the supervisor's own values stay in memory.
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        try:
            reserved = reserve_port(self.host, self.port)
        except OSError as exc:
            _log.error("supervisor: cannot bind %s:%d: %s", self.host, self.port, exc)
            return 1
        self.port = int(reserved.getsockname()[1])
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            with reserved, tempfile.TemporaryDirectory(prefix="gradserve-metrics-") as metrics_dir:
                self._metrics_dir = metrics_dir
                if self.metrics_port:
                    self._serve_metrics()
                _log.info("supervisor: %d workers on %s:%d", len(self._workers), self.host, self.port)
                try:
                    self._loop()
                finally:
                    self._drain()
                    if self._http is not None:
                        self._http.shutdown()
                        self._http.server_close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        _log.info("supervisor: every worker stopped")
        return self._exit_code

    def _loop(self) -> None:
        for w in self._workers:
            self._spawn(w)
        while not self._stopping:
            now = time.monotonic()
            for w in self._workers:
                if w.proc is not None:
                    self._reap(w, now)
                elif w.restart_at is not None and now >= w.restart_at and not self._stopping:
                    self._spawn(w)
            time.sleep(_TICK_S)


async def watch_parent(stop: asyncio.Event, interval: float = 1.0) -> None:
    """Set ``stop`` when this process's parent (the supervisor) is gone: a worker must not
    outlive it (its port would stay served by an unsupervised process)."""
    parent = os.getppid()
    while not stop.is_set():
        if os.getppid() != parent:
            logging.getLogger("gradserve.server").warning("supervisor (pid %d) is gone; shutting down", parent)
            stop.set()
            return
        await asyncio.sleep(interval)
