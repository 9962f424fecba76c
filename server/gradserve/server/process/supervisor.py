"""The process supervisor of ``gradserve serve --workers N``: N worker processes on one port.

One Python process with one event loop serves at most about one core's worth of gRPC work.
``--workers N`` starts a supervisor that serves nothing itself: it starts N copies of the same
``gradserve serve`` command (with the hidden ``--worker-index``), each loading its own models and
binding the same ``host:port`` with ``SO_REUSEPORT``, so that the kernel spreads incoming
connections over them. The supervisor

- takes the port first (``reserve_port``: ``--port 0`` picks one free port that every worker
  then binds), and the ``--http-port`` too: a port in use (another server, another supervisor)
  is a configuration error, exit 2 before any worker starts. It keeps a bound, never-listening
  socket on each, so the ports stay reserved while workers restart: no socket without
  ``SO_REUSEPORT`` and none of another user can bind them meanwhile, and a socket of the same
  user that joins with ``SO_REUSEPORT`` (the kernel allows it) is reported (``PortWatch``);
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
never handed a connection it cannot answer. A worker never outlives its supervisor, even one
killed with SIGKILL while the workers still import TensorFlow: the first thing a worker does
(``follow_supervisor``, before anything slow) is to ask the kernel for SIGTERM when its parent
dies (Linux's parent-death signal), then check that its parent is still the supervisor (which
may have died before that). Elsewhere ``watch_parent`` polls the parent. This module never
imports TensorFlow.
"""
from __future__ import annotations

import asyncio
import contextlib
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

__all__ = ["RestartPolicy", "Supervisor", "PortInUse", "PortWatch", "worker_count", "follow_supervisor",
           "watch_parent", "KILL_MARGIN_S", "CONFIG_ERROR_EXIT", "SUPERVISOR_PID_ENV"]

_log = logging.getLogger("gradserve.server.process.supervisor")

#: Seconds after ``grace_seconds`` at which workers still alive are killed.
KILL_MARGIN_S = 5.0
#: Exit code of ``gradserve serve`` for a configuration error: such a worker is not restarted.
CONFIG_ERROR_EXIT = 2
#: The environment variable with the supervisor's pid, set for its workers only.
SUPERVISOR_PID_ENV = "GRADSERVE_SUPERVISOR_PID"
_TICK_S = 0.1
#: Seconds between two looks for foreign listeners on the served ports (``PortWatch``).
_WATCH_S = 1.0
_PR_SET_PDEATHSIG = 1


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


class PortInUse(OSError):
    """The port is served already (another server or supervisor): a configuration error."""


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening socket on ``host:port`` that keeps the port this supervisor's
    (port 0 picks a free one); raises ``PortInUse`` where something else holds it.

    ``SO_REUSEADDR`` only, as a single server binds: the bind fails where anything listens on
    the port (a server, the workers of another supervisor) or holds it without ``SO_REUSEADDR``,
    and passes over connections in TIME_WAIT. The workers bind beside it (``SO_REUSEADDR`` and
    ``SO_REUSEPORT``; the kernel hands connections to listening sockets only). While it is
    held, a socket without ``SO_REUSEPORT`` never gets the port, nor one of another user. What
    the kernel does let in, a socket of the same user with ``SO_REUSEPORT``, is found and
    reported by ``PortWatch``.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise PortInUse(exc.errno, exc.strerror) from None
    return sock


def claim_port(reserved: socket.socket) -> socket.socket | None:
    """A lock on the reserved address among gradserve supervisors (Linux: an abstract Unix
    socket named after it, freed by the kernel when the supervisor dies); raises ``PortInUse``
    when another supervisor holds it. A reservation does not stop another supervisor's
    reservation while no worker listens yet (both are ``SO_REUSEADDR`` sockets): this does."""
    if not sys.platform.startswith("linux"):
        return None
    address, port = reserved.getsockname()[:2]
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0gradserve-supervisor/{address}/{port}")
    except OSError as exc:
        lock.close()
        raise PortInUse(exc.errno, "another gradserve supervisor serves it") from None
    return lock


def _hex_address(text: str) -> str:
    """The IP of a /proc/net/tcp[6] address field (hex, in host byte order per 32-bit word)."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(words) == 4 else socket.AF_INET6, words)


def listening_sockets(port: int) -> dict[int, str]:
    """inode -> IP of every socket listening on TCP ``port`` in this network namespace (Linux)."""
    found: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            address, _, hex_port = fields[1].rpartition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found[int(fields[9])] = _hex_address(address)
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` has open (empty when it is gone)."""
    inodes: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _owner(inode: int) -> str:
    """``pid N, 'command'`` of a process holding socket ``inode``, as far as /proc shows."""
    link = f"socket:[{inode}]"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") == link for fd in os.listdir(f"/proc/{entry}/fd")):
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace")
                return f"pid {entry}, {command.strip()[:200]!r}"
        except OSError:
            continue
    return "a process this one cannot see"


class PortWatch:
    """Finds listeners on the served ports that are none of the workers' (Linux /proc).

    The kernel lets any socket of the same user with ``SO_REUSEPORT`` join a port the workers
    share, and then hands it a share of the new connections; nothing at bind time can tell it
    from a worker. So the supervisor looks: a listener on one of its ports, on its address or a
    wildcard one, seen twice in a row and held by no worker, is logged as an error once and
    counted in ``gradserve_foreign_listeners``.
    """

    def __init__(self, ports: dict[str, tuple[str, int]]) -> None:
        #: label ("gRPC", "HTTP") -> (IP the port was reserved on, port)
        self.ports = ports
        self.foreign: set[int] = set()
        self._ours: set[int] = set()
        self._suspects: set[int] = set()

    def _overlaps(self, ours: str, theirs: str) -> bool:
        wildcard = ("0.0.0.0", "::")
        return ours == theirs or ours in wildcard or theirs in wildcard or theirs == f"::ffff:{ours}"

    def check(self, worker_pids: Sequence[int]) -> None:
        if not sys.platform.startswith("linux"):
            return
        seen: dict[int, tuple[str, str]] = {}
        for label, (address, port) in self.ports.items():
            for inode, ip in listening_sockets(port).items():
                if self._overlaps(address, ip):
                    seen[inode] = (label, f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
        unknown = set(seen) - self._ours - self.foreign
        if unknown:
            for pid in worker_pids:
                self._ours |= socket_inodes(pid)
            unknown -= self._ours
        for inode in unknown & self._suspects:
            self.foreign.add(inode)
            label, where = seen[inode]
            _log.error("supervisor: a process outside this supervisor (%s) listens on %s (the %s port) with "
                       "SO_REUSEPORT and takes a share of its new connections; the kernel lets processes of "
                       "the same user join such a port, so stop that process", _owner(inode), where, label)
        self._suspects = unknown
        self.foreign &= set(seen)
        self._ours &= set(seen)


class Supervisor:
    """Runs ``workers`` copies of ``worker_command`` (plus the port and index) until stopped.

    Parameters
    ----------
    serve_argv
        The ``gradserve serve ...`` arguments the supervisor was started with (``serve``
        included); each worker runs them with ``--port``, ``--workers 1``, ``--metrics-port 0``
        and ``--worker-index`` appended (argparse keeps the last value of a flag).
    workers, host, port, grace_seconds, metrics_port, http_port
        As the flags of the same names.
    policy
        When exited workers are restarted.
    """

    def __init__(self, serve_argv: Sequence[str], *, workers: int, host: str, port: int, grace_seconds: float,
                 metrics_port: int = 0, http_port: int = 0, policy: RestartPolicy = RestartPolicy()) -> None:
        self.serve_argv = list(serve_argv)
        self.host = host
        self.port = port
        self.http_port = http_port
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
        self._watch = PortWatch({})

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
        # Spawned from the main thread: the parent-death signal fires when the thread that
        # started the child ends, and this one ends with the process.
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self._metrics_dir, **{SUPERVISOR_PID_ENV: str(os.getpid())})
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
        foreign = Gauge("gradserve_foreign_listeners", "Sockets of other processes listening on the served ports "
                        "(joined with SO_REUSEPORT)", registry=registry)
        foreign.set_function(lambda: len(self._watch.foreign))
        self._http, _ = start_http_server(self.metrics_port, addr=self.host, registry=registry)
        _log.info("supervisor: metrics of all workers on http://%s:%d/metrics", self.host,
                  self._http.server_port)

    def _mark_dead(self, pid: int) -> None:
        # Drops the live gauges (in-flight RPCs) of a dead worker; its counters keep counting.
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self._metrics_dir)

    # -- main loop ------------------------------------------------------------------------------
    def _take_ports(self, stack: contextlib.ExitStack) -> bool:
        """Reserve and lock the gRPC port (and the HTTP one); False, logged, where one is in use."""
        ports = {"gRPC": self.port} | ({"HTTP": self.http_port} if self.http_port else {})
        for label, port in ports.items():
            where = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
            try:
                reserved = stack.enter_context(reserve_port(self.host, port))
                lock = claim_port(reserved)
                if lock is not None:
                    stack.enter_context(lock)
            except PortInUse as exc:
                _log.error("supervisor: the %s port %s is in use (%s; another server or gradserve supervisor "
                           "serves it)", label, where, exc.strerror)
                return False
            address, bound = reserved.getsockname()[:2]
            self._watch.ports[label] = (str(address), int(bound))
            if label == "gRPC":
                self.port = int(bound)
        return True

    def run(self) -> int:
        """Start the workers and supervise them until SIGTERM/SIGINT; returns the exit code."""
        # The metrics directory is ours (one per supervisor); the supervisor's own values stay in memory.
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with contextlib.ExitStack() as ports:
            if not self._take_ports(ports):
                return CONFIG_ERROR_EXIT
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                with tempfile.TemporaryDirectory(prefix="gradserve-metrics-") as metrics_dir:
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
        next_watch = 0.0
        while not self._stopping:
            now = time.monotonic()
            if now >= next_watch:
                self._watch.check([w.proc.pid for w in self._alive() if w.proc is not None])
                next_watch = now + _WATCH_S
            for w in self._workers:
                if w.proc is not None:
                    self._reap(w, now)
                elif w.restart_at is not None and now >= w.restart_at and not self._stopping:
                    self._spawn(w)
            time.sleep(_TICK_S)


def _die_with_parent(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(sig), ctypes.c_ulong(0),
                          ctypes.c_ulong(0), ctypes.c_ulong(0))) == 0


def follow_supervisor() -> int | None:
    """In a worker, first thing: die with the supervisor. Returns its pid (None in any other process).

    SIGTERM is asked for when the parent dies: the default action ends a worker still importing
    TensorFlow, and a serving worker drains. A supervisor that died before the signal was armed
    left this process with another parent: it exits at once (code 1), having loaded nothing.
    """
    text = os.environ.pop(SUPERVISOR_PID_ENV, "")
    if not text.isdigit():
        return None
    supervisor = int(text)
    _die_with_parent(signal.SIGTERM)
    if os.getppid() != supervisor:
        sys.stderr.write(f"gradserve worker {os.getpid()}: supervisor (pid {supervisor}) is gone; exiting\n")
        sys.stderr.flush()
        os._exit(1)
    return supervisor


async def watch_parent(stop: asyncio.Event, parent: int | None = None, interval: float = 1.0) -> None:
    """Set ``stop`` when this process's parent (the supervisor, pid ``parent``) is gone: a worker
    must not outlive it (its port would stay served by an unsupervised process). Where the kernel
    has no parent-death signal this is what stops a worker, within ``interval``."""
    parent = os.getppid() if parent is None else parent
    while not stop.is_set():
        if os.getppid() != parent:
            logging.getLogger("gradserve.server").warning("supervisor (pid %d) is gone; shutting down", parent)
            stop.set()
            return
        await asyncio.sleep(interval)
