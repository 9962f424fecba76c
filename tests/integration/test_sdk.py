"""The synchronous SDK against live servers: streams, row chunking of large tensors, deadlines,
retries (through a fault-injecting proxy in front of a real server) and two servers behind one
client with one stopped mid-run. What Client and AsyncClient must do alike is in test_sdk_twins."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from flaky_proxy import FlakyProxy

import gradserve
from subprocess_server import free_port, wait_serving

MIB = 1 << 20


def dense2_expected(x: np.ndarray) -> np.ndarray:
    return 0.5 * x.sum(axis=1) + 0.1


# -- streams -------------------------------------------------------------------------------------
def test_stream_of_1000_batches_returns_in_order(client):
    batches = (np.full((2, 4), i, np.float32) for i in range(1000))
    results = list(client.stream("dense2", batches, method="gradient", return_outputs=True, window=16))
    assert len(results) == 1000
    for i, (y, g) in enumerate(results):
        np.testing.assert_allclose(y[:, 0], 2.0 * i + 0.1, rtol=1e-5)
        np.testing.assert_allclose(g, 0.5, rtol=1e-6)


# -- large tensors -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(start_server):
    """A server whose messages are limited to 1 MiB, so that chunking is cheap to exercise."""
    from gradserve.server.config import EngineConfig, Limits, ServerConfig

    return start_server(ServerConfig(demo_models=True, limits=Limits(max_message_bytes=MIB),
                                     engine=EngineConfig(xla="off")))


@pytest.fixture()
def small_client(small_server):
    with gradserve.Client(small_server.address, max_message_bytes=MIB) as c:
        yield c


def test_inputs_and_outputs_larger_than_a_message_are_chunked_and_reassembled(small_client):
    x = np.random.default_rng(0).uniform(-1, 1, (200_000, 4)).astype(np.float32)  # 3.2 MB in, 4 MB out
    y, g = small_client.gradient("dense2", x, return_outputs=True)
    assert g.shape == x.shape and y.shape == (200_000, 1)
    np.testing.assert_allclose(g, 0.5, rtol=1e-6)
    np.testing.assert_allclose(y[:, 0], dense2_expected(x), rtol=1e-5, atol=1e-5)


def test_chunked_per_example_targets_match_an_unchunked_call(small_client, client):
    images = np.random.default_rng(1).uniform(0, 1, (1200, 16, 16, 1)).astype(np.float32)  # 1.2 MB
    target = np.arange(1200) % 10
    chunked = small_client.gradient("cnn", images, target=target)
    whole = client.gradient("cnn", images, target=target)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-7)


def test_one_example_larger_than_a_message_is_resource_exhausted(small_server, small_client):
    # A 16x16 image is 1 KiB; a client whose messages leave less than that for data refuses it
    # before sending anything.
    with gradserve.Client(small_server.address, max_message_bytes=64 * 1024 + 512) as tight:
        with pytest.raises(gradserve.ResourceExhausted, match="one example needs about"):
            tight.gradient("cnn", np.zeros((3, 16, 16, 1), np.float32))
    # A stream batch is one message: too large a batch is refused with its position.
    with pytest.raises(gradserve.ResourceExhausted, match=r"batches\[1\]"):
        list(small_client.stream("dense2", [np.ones((1, 4)), np.ones((100_000, 4))], method="predict"))


# -- deadlines -----------------------------------------------------------------------------------
def test_per_call_timeout_raises_deadline_exceeded(client):
    x = np.ones((4096, 16, 16, 1), np.float32)
    with pytest.raises(gradserve.DeadlineExceeded):
        client.gradient("cnn", x, timeout=1e-4)
    with gradserve.Client(client._target, timeout=1e-3) as hasty:   # the client's default deadline
        with pytest.raises(gradserve.DeadlineExceeded):
            hasty.gradient("cnn", x)
        np.testing.assert_allclose(hasty.gradient("dense2", np.ones((1, 4), np.float32), timeout=30), 0.5, rtol=1e-6)


# -- retries -------------------------------------------------------------------------------------
@pytest.fixture()
def proxy(demo_server):
    p = FlakyProxy(demo_server.address)
    yield p
    p.close()


def test_unavailable_unary_calls_are_retried_by_the_channel(proxy):
    with gradserve.Client(f"127.0.0.1:{proxy.port}") as c:
        g = c.gradient("dense2", np.ones((3, 4)))
        np.testing.assert_allclose(g, 0.5, rtol=1e-6)
    compute = [prev for m, prev in proxy.attempts if m.endswith("/Compute")]
    assert compute == [None, "1"]  # failed once, retried once
    assert any(m.endswith("/GetModel") and prev == "1" for m, prev in proxy.attempts)


def test_other_errors_are_not_retried(proxy):
    with gradserve.Client(f"127.0.0.1:{proxy.port}") as c:
        with pytest.raises(gradserve.NotFound):
            c.compute("nope", "predict", np.ones((1, 4)))
    assert [prev for m, prev in proxy.attempts if m.endswith("/Compute")] == [None, "1"]
    with gradserve.Client(f"127.0.0.1:{proxy.port}", retries=0) as c:
        with pytest.raises(gradserve.Unavailable, match="injected"):
            c.models()


def test_stream_is_pipelined_within_its_window(demo_server):
    # The proxy releases answer i only after request i+1 arrived: a client that waited for each
    # answer before sending the next request would stall on every response.
    held = FlakyProxy(demo_server.address, break_after=None, hold=True)
    try:
        with gradserve.Client(f"127.0.0.1:{held.port}") as c:
            results = list(c.stream("dense2", (np.full((1, 4), i, np.float32) for i in range(30)),
                                    method="predict", window=4))
    finally:
        held.close()
    np.testing.assert_allclose([r[0, 0] for r in results], 2.0 * np.arange(30) + 0.1, rtol=1e-5)
    assert held.hold_timeouts == 0
    assert 2 <= held.most_outstanding <= 4


@pytest.mark.parametrize("code, retried", [
    (grpc.StatusCode.CANCELLED, True),            # a server shutting down drops accepted calls so
    (grpc.StatusCode.RESOURCE_EXHAUSTED, False),  # nothing but UNAVAILABLE and that is retried
    (grpc.StatusCode.INTERNAL, False),
])
def test_only_a_server_going_away_is_retried(demo_server, code, retried):
    p = FlakyProxy(demo_server.address, first_code=code)
    try:
        with gradserve.Client(f"127.0.0.1:{p.port}") as c:
            if retried:
                np.testing.assert_allclose(c.predict("dense2", np.ones((1, 4)), timeout=30), 2.1, rtol=1e-6)
            else:
                with pytest.raises(gradserve.GradserveError, match="injected") as err:
                    c.predict("dense2", np.ones((1, 4)), timeout=30)
                assert err.value.code == code
    finally:
        p.close()
    if retried:
        assert [prev for m, prev in p.attempts if m.endswith("/Compute")] == [None, "1"]
    else:   # the metadata fetch's error is the caller's: nothing else is sent
        assert [(m.rsplit("/", 1)[1], prev) for m, prev in p.attempts] == [("GetModel", None)]


# -- several servers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense2_file(tmp_path_factory) -> str:
    from gradserve.server.models import demo

    path = str(tmp_path_factory.mktemp("models") / "dense2.keras")
    demo.build_dense2().save(path)
    return path


def _serve(path: str, port: int, metrics_port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--model", f"dense2={path}",
                             "--port", str(port), "--grace-seconds", "10", "--xla", "off",
                             "--metrics-port", str(metrics_port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _requests_served(metrics_port: int) -> float:
    """Compute requests a server has answered, from its Prometheus counter."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("gradserve_requests_total{"))


def test_two_servers_one_stopped_mid_run_no_call_fails(dense2_file):
    ports = [free_port(), free_port()]
    metrics = [free_port(), free_port()]
    procs = [_serve(dense2_file, p, m) for p, m in zip(ports, metrics)]
    try:
        for port, proc in zip(ports, procs):
            wait_serving(f"127.0.0.1:{port}", proc)
        failures: list[BaseException] = []
        done = [0]
        stop = threading.Event()
        lock = threading.Lock()
        with gradserve.Client([f"127.0.0.1:{p}" for p in ports], timeout=30) as c:
            def work(seed: int) -> None:
                rng = np.random.default_rng(seed)
                while not stop.is_set():
                    x = rng.uniform(-1, 1, (8, 4)).astype(np.float32)
                    try:
                        y = c.predict("dense2", x)
                        np.testing.assert_allclose(y[:, 0], dense2_expected(x), rtol=1e-5, atol=1e-5)
                    except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                        failures.append(exc)
                    with lock:
                        done[0] += 1

            threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            while done[0] < 100:
                time.sleep(0.01)
            assert all(_requests_served(m) > 0 for m in metrics)   # balanced: both servers answer
            procs[0].send_signal(signal.SIGTERM)   # one server goes away mid-run
            procs[0].wait(30)
            after = done[0]
            while done[0] < after + 200:
                time.sleep(0.01)
            stop.set()
            for t in threads:
                t.join(30)
        assert failures == []
        assert procs[0].returncode is not None and procs[1].poll() is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


# -- README --------------------------------------------------------------------------------------
def test_readme_sdk_examples_run(demo_server):
    import re

    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    section = text.split("<!-- sdk-examples: begin -->")[1].split("<!-- sdk-examples: end -->")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 9
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block.replace("127.0.0.1:50051", demo_server.address), "README.md", "exec"), namespace)
