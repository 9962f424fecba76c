"""The gRPC server's channel arguments agree with what the SDK's channels do."""
from __future__ import annotations

from gradserve._channel import KEEPALIVE_TIME_MS, channel_options
from gradserve.server.config import ServerConfig
from gradserve.server.process.app import server_options


def test_the_server_accepts_the_sdks_keepalive_pings_while_no_data_flows() -> None:
    # gRPC's default (one ping per 5 minutes without data, then GOAWAY "too many pings") ended
    # analyses whose bootstrap sent nothing for about 90 s.
    server = dict(server_options(ServerConfig()))
    client = dict(channel_options(64 << 20, True, 4))
    assert client["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] < KEEPALIVE_TIME_MS
