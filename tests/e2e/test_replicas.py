"""Client-side balancing over replicas: ``gradserve.Client([...])`` over three servers on
127.0.0.2-4 (one port number, as real replicas have), one SIGKILLed under load, then a rolling
restart of the other two, loses no call."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gradserve
from subprocess_server import wait_serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def _port_free_on_every_host() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOSTS[0], 0))
            port = int(s.getsockname()[1])
        try:
            for host in HOSTS[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every replica address")


def _save_model(path: Path) -> None:
    """A Keras model with output = 0.5 * sum(x): its gradient is 0.5 everywhere."""
    import keras

    inputs = keras.Input((4,), name="input")
    outputs = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(0.5),
                                 bias_initializer=keras.initializers.Constant(0.0))(inputs)
    keras.Model(inputs, outputs).save(path)


def test_replicas_killed_and_rolled_lose_no_call(tmp_path: Path) -> None:
    model = tmp_path / "lin.keras"
    _save_model(model)
    port = _port_free_on_every_host()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = []

    def start(host: str) -> None:
        log = open(tmp_path / f"{host}.log", "ab")
        logs.append(log)
        procs[host] = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--host", host,
                                        "--port", str(port), "--model", f"lin={model}", "--xla", "off",
                                        "--grace-seconds", "10"], stdout=log, stderr=subprocess.STDOUT, env=env)

    results: list[str] = []
    stop = threading.Event()
    x = np.arange(12, dtype=np.float32).reshape(3, 4)

    def load() -> None:
        with gradserve.Client([f"{h}:{port}" for h in HOSTS], timeout=60) as c:
            while not stop.is_set():
                try:
                    g = c.gradient("lin", x)
                    results.append("OK" if g.shape == x.shape and np.allclose(g, 0.5) else f"wrong answer {g!r}")
                except gradserve.GradserveError as exc:
                    results.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.002)

    def calls_after(n: int) -> None:
        """Wait until ``n`` more calls have been answered (bounded)."""
        target, deadline = len(results) + n, time.monotonic() + 120
        while len(results) < target:
            assert time.monotonic() < deadline, f"load stalled: {results[-5:]}"
            time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(6)]
    try:
        for host in HOSTS:
            start(host)
        for host in HOSTS:
            wait_serving(f"{host}:{port}", procs[host], timeout=300)
        for t in threads:
            t.start()
        calls_after(150)
        procs[HOSTS[0]].send_signal(signal.SIGKILL)     # one replica lost mid-load, not restarted
        assert procs[HOSTS[0]].wait(30) == -signal.SIGKILL
        calls_after(150)
        for host in HOSTS[1:]:                          # rolling restart of the other two
            procs[host].send_signal(signal.SIGTERM)
            assert procs[host].wait(60) == 0
            calls_after(50)                            # the last replica standing serves alone
            start(host)
            wait_serving(f"{host}:{port}", procs[host], timeout=300)
            calls_after(150)
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(90)
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        for log in logs:
            log.close()
    failed = [r for r in results if r != "OK"]
    assert failed == [] and len(results) >= 800
