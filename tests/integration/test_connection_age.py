"""``--max-connection-age``: the server closes connections that old, after their calls finish,
and clients reconnect (re-resolving the name: how they reach replicas added since) without
losing a call."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

import numpy as np
import pytest

import gradserve
from gradserve.server.config import EngineConfig, ServerConfig

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp*")


def _client_ports(server_port: int) -> set[int]:
    """Local ports of the established TCP connections to ``server_port`` (gRPC's sockets are
    IPv6 ones with IPv4-mapped addresses, listed in tcp6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            lines = rows.read().splitlines()[1:]
        for line in lines:
            local, remote, state = line.split()[1:4]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def _calls_and_connections(address: str, port: int, seconds: float) -> tuple[int, set[int]]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    seen: set[int] = set()
    calls = 0
    with gradserve.Client(address, timeout=30) as c:
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at:
            assert np.allclose(c.gradient("dense2", x), 0.5)
            calls += 1
            seen |= _client_ports(port)
            time.sleep(0.01)
    return calls, seen


def test_connections_are_replaced_at_their_age_and_no_call_fails(start_server: Callable[..., Any]) -> None:
    srv = start_server(ServerConfig(demo_models=True, engine=EngineConfig(xla="off")), max_connection_age_s=0.5,
                       grace_seconds=2.0)
    calls, seen = _calls_and_connections(srv.address, srv.port, 3.0)
    # One client keeps one connection unless the server closes it: here about every half second.
    assert calls > 10 and len(seen) >= 3

