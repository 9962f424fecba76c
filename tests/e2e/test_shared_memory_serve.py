"""`gradserve serve` and SDK clients in their own processes, sharing memory: a client killed with
SIGKILL leaves nothing in /dev/shm, and the server unmaps its regions once it notices; flags."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from subprocess_server import free_port, wait_serving

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory lives in /dev/shm (Linux)")

#: A client that sends one call through shared memory, says so, and waits to be killed.
CLIENT = textwrap.dedent("""
    import sys
    import numpy as np
    import gradserve
    c = gradserve.Client(sys.argv[1], shared_memory=True, shared_memory_threshold=0)
    g = c.gradient("dense2", np.ones((256, 4), np.float32))
    assert c._shm.core.sent == 1 and abs(float(g[0, 0]) - 0.5) < 1e-6, (c._shm.core.sent, g[0])
    print("sent", flush=True)
    sys.stdin.read()
""")


def _gauge(metrics_port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not exported")


def _wait_for(what: object, message: str) -> None:
    end = time.monotonic() + 120
    while not what():  # type: ignore[operator]
        assert time.monotonic() < end, message
        time.sleep(0.05)


def test_a_killed_client_leaves_nothing_behind(tmp_path, log_file):
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    log = log_file(tmp_path / "server.log")
    server = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--port", str(port), "--xla", "off",
                               "--metrics-port", str(metrics_port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_serving(f"127.0.0.1:{port}", server)
        client = subprocess.Popen([sys.executable, "-c", CLIENT, f"127.0.0.1:{port}"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        with client:
            assert client.stdout.readline().strip() == "sent"  # type: ignore[union-attr]
            assert _gauge(metrics_port, "gradserve_shm_regions") == 1
            # Its segment was unlinked once the server had mapped it: nothing is named in /dev/shm.
            assert [n for n in os.listdir("/dev/shm") if n.startswith(f"gradserve-{client.pid}-")] == []
            client.send_signal(signal.SIGKILL)
            client.wait(60)
        # The kernel closed the killed process's connection; the server ends its session and unmaps.
        _wait_for(lambda: _gauge(metrics_port, "gradserve_shm_regions") == 0, "the server kept the region mapped")
        assert _gauge(metrics_port, "gradserve_shm_bytes_mapped") == 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
    log.seek(0)
    assert "same-host shared memory on" in log.read()


def test_serve_flags() -> None:
    from gradserve.server.process.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.shared_memory is None and args.max_shm_regions == 256 and args.max_shm_bytes == 32 << 30
    args = build_parser().parse_args(["serve", "--shared-memory", "off", "--max-shm-regions", "2",
                                      "--max-shm-bytes", "4096"])
    assert (args.shared_memory, args.max_shm_regions, args.max_shm_bytes) == ("off", 2, 4096)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--shared-memory", "maybe"])
