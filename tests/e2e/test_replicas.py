"""Client-side balancing over replicas: ``gradserve.Client([...])`` over three servers on
127.0.0.2-4 (one port number, as real replicas have), one SIGKILLed under load, then a rolling
restart of the other two, loses no call: a draining replica reports NOT_SERVING and serves on
until its callers moved away, and while no replica is ready a call waits for one."""
from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gradserve
from subprocess_server import ServeProcess, wait_for

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
    servers: dict[str, ServeProcess] = {}

    def start(host: str) -> None:
        servers[host] = ServeProcess(tmp_path / f"{host}.log", "--model", f"lin={model}", "--xla", "off",
                                     "--grace-seconds", "10", host=host, port=port).start()

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
        target = len(results) + n
        wait_for(lambda: len(results) >= target, f"{n} more calls (last: {results[-3:]})")

    threads = [threading.Thread(target=load) for _ in range(6)]
    try:
        for host in HOSTS:
            start(host)
        for host in HOSTS:
            servers[host].wait_serving()
        for t in threads:
            t.start()
        calls_after(150)
        servers[HOSTS[0]].send_signal(signal.SIGKILL)   # one replica lost mid-load, not restarted
        assert servers[HOSTS[0]].wait(30) == -signal.SIGKILL
        calls_after(150)
        for host in HOSTS[1:]:                          # rolling restart of the other two
            assert servers[host].terminate(60) == 0
            servers[host].close()
            calls_after(50)                             # the last replica standing serves alone
            start(host)
            servers[host].wait_serving()
            calls_after(150)
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(90)
        for server in servers.values():
            server.close()
    failed = [r for r in results if r != "OK"]
    assert failed == [] and len(results) >= 800
