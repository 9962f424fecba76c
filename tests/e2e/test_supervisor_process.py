"""The supervisor of `gradserve serve --workers N` and its ports, each case with a supervisor of
its own: workers never outlive a supervisor killed while they start, the ports it serves are its
own (another supervisor, a server or a socket without SO_REUSEPORT is refused; a socket that
joins with SO_REUSEPORT is reported), and a busy port is a configuration error (exit 2 at once).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from subprocess_server import ServeProcess, free_port, pid_gone, serve_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_REUSEPORT, /proc and the parent-death signal are Linux's")]


def _children(pid: int) -> list[int]:
    """Worker processes of ``pid`` (from /proc: their parent is ``pid``, ``--worker-index`` in their command)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"--worker-index" in cmdline:
            found.append(int(entry))
    return sorted(found)


def _refused(host: str, port: int) -> bool:
    """Whether a connection to ``host:port`` is refused (nothing listens there)."""
    try:
        with socket.create_connection((host, port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_workers_die_with_a_supervisor_killed_while_they_start(tmp_path: Path) -> None:
    # SIGKILL leaves the supervisor no chance to stop its workers: the kernel's parent-death
    # signal must, even while they still import TensorFlow (armed before anything slow).
    with ServeProcess(tmp_path / "server.log", "--workers", "2", "--xla", "off") as server:
        workers = wait_for(lambda: len(_children(server.pid)) == 2 and _children(server.pid), "two workers")
        assert "listening on" not in server.log_text()   # still starting
        server.send_signal(signal.SIGKILL)
        assert server.wait(30) == -signal.SIGKILL
        try:
            wait_for(lambda: all(pid_gone(p) for p in workers), f"workers {workers} to exit", timeout=60)
        finally:
            _kill_all(workers)
        assert _refused(server.host, server.port)


def test_a_worker_whose_supervisor_is_already_gone_exits_at_once(tmp_path: Path) -> None:
    # The race the parent-death signal cannot cover: the supervisor died before the worker armed
    # it. The worker sees a parent that is not its supervisor and exits before loading anything.
    port = free_port()
    gone = subprocess.Popen(["true"])
    gone.wait(30)   # a supervisor that exited: its pid is not the worker's parent (this process)
    out = subprocess.run([sys.executable, "-m", "gradserve", "serve", "--port", str(port), "--workers", "1",
                          "--worker-index", "0"], env=serve_env(GRADSERVE_SUPERVISOR_PID=str(gone.pid)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"supervisor (pid {gone.pid}) is gone" in out.stderr and "listening on" not in out.stderr
    assert _refused("127.0.0.1", port)


_BIND_PROBE = """
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket()
if kind in ("reuseaddr", "both"):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if kind in ("reuseport", "both"):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
try:
    s.bind((host, port))
    s.listen()
except OSError as exc:
    print(exc.errno)
else:
    print(0)
"""


def _foreign_bind(kind: str, host: str, port: int, uid: int | None = None) -> int:
    """errno of binding and listening on ``host:port`` from this process (0: it could), with
    SO_REUSEADDR, SO_REUSEPORT, both or neither (``kind``); ``uid``: as a socket of that user
    (root gives it away with fchown, which sets the owner the kernel compares for SO_REUSEPORT)."""
    with socket.socket() as s:
        if kind in ("reuseaddr", "both"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if kind in ("reuseport", "both"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if uid is not None:
            os.fchown(s.fileno(), uid, -1)
        try:
            s.bind((host, port))
            s.listen()
        except OSError as exc:
            return exc.errno
        return 0


def _listening(server: ServeProcess) -> int:
    return server.log_text().count("gradserve.server [-] listening on")


def test_the_ports_of_a_supervisor_are_its_own(tmp_path: Path) -> None:
    import errno

    http_port = free_port()
    with ServeProcess(tmp_path / "a.log", "--workers", "2", "--xla", "off", "--http-port", str(http_port)) as a:
        wait_for(lambda: "supervisor: 2 workers on" in a.log_text(), "the supervisor to take its ports")
        # A second supervisor on the same port, while the first one's workers still load: refused
        # at once, as a configuration error (no worker started).
        second = subprocess.run([*a.command[:-len(a.args)], "--workers", "2"], env=serve_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"{a.address} is in use" in second.stderr and "started (pid" not in second.stderr
        a.wait_serving()
        wait_for(lambda: _listening(a) == 2, "both workers to listen")
        # The same on its HTTP port, and a single-process server on its gRPC port.
        third = subprocess.run([sys.executable, "-m", "gradserve", "serve", "--port", str(free_port()),
                                "--workers", "2", "--http-port", str(http_port)], env=serve_env(),
                               capture_output=True, text=True, timeout=120)
        assert third.returncode == 2, third.stderr
        assert f"127.0.0.1:{http_port} is in use" in third.stderr and "started (pid" not in third.stderr
        single = subprocess.run([sys.executable, "-m", "gradserve", "serve", "--port", str(a.port), "--xla", "off"],
                                env=serve_env(), capture_output=True, text=True, timeout=300)
        assert single.returncode == 2, single.stderr
        assert f"cannot bind the gRPC port {a.address}" in single.stderr and "Traceback" not in single.stderr
        for port in (a.port, http_port):
            # Sockets without SO_REUSEPORT never share the port.
            assert _foreign_bind("plain", "127.0.0.1", port) == errno.EADDRINUSE
            assert _foreign_bind("reuseaddr", "127.0.0.1", port) == errno.EADDRINUSE
            if os.geteuid() == 0:   # the kernel refuses SO_REUSEPORT to sockets of another user
                assert _foreign_bind("reuseport", "127.0.0.1", port, uid=65534) == errno.EADDRINUSE
                assert _foreign_bind("both", "127.0.0.1", port, uid=65534) == errno.EADDRINUSE
        assert a.poll() is None and _listening(a) == 2
        assert a.terminate() == 0


def test_a_process_of_the_same_user_joining_with_so_reuseport_is_reported(tmp_path: Path) -> None:
    # The kernel lets sockets of the same user join a SO_REUSEPORT port: the supervisor cannot
    # refuse it, so it finds it (a listener on its port that is none of its workers') and says so.
    with ServeProcess(tmp_path / "a.log", "--workers", "2", "--xla", "off") as a:
        a.wait_serving()
        wait_for(lambda: _listening(a) == 2, "both workers to listen")
        intruder = subprocess.Popen([sys.executable, "-c", _BIND_PROBE.replace("print(0)", "print(0, flush=True)\n"
                                     "    sys.stdin.read()"), "reuseport", "127.0.0.1", str(a.port)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert intruder.stdout is not None and intruder.stdout.readline().strip() == "0"
            wait_for(lambda: f"(pid {intruder.pid}" in a.log_text(), "the supervisor to report the intruder", 60)
            line = next(x for x in a.log_text().splitlines() if f"(pid {intruder.pid}" in x)
            assert "ERROR" in line and f"listens on {a.address}" in line and "SO_REUSEPORT" in line
        finally:
            intruder.kill()
            intruder.wait(30)
            assert intruder.stdin is not None and intruder.stdout is not None
            intruder.stdin.close()
            intruder.stdout.close()
        assert a.terminate() == 0


def test_a_busy_http_port_is_a_configuration_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        http_port = busy.getsockname()[1]
        # Under a supervisor: refused before any worker starts (not a worker restarted forever).
        out = subprocess.run([sys.executable, "-m", "gradserve", "serve", "--port", str(free_port()), "--workers",
                              "2", "--http-port", str(http_port)], env=serve_env(),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert f"127.0.0.1:{http_port} is in use" in out.stderr and "started (pid" not in out.stderr
        # A single server says which port, without a traceback.
        out = subprocess.run([sys.executable, "-m", "gradserve", "serve", "--port", str(free_port()), "--xla", "off",
                              "--http-port", str(http_port)], env=serve_env(),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr
        assert f"cannot bind the HTTP port 127.0.0.1:{http_port}" in out.stderr and "Traceback" not in out.stderr
