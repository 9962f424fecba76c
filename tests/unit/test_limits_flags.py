"""The stream, call and memory limits' flags fill ``Limits`` (their defaults are ``Limits()``'s)."""
from __future__ import annotations

from gradserve.server.config import Limits, LoadingConfig
from gradserve.server.process import cli


def test_stream_call_and_memory_flags_fill_limits() -> None:
    args = cli.build_parser().parse_args([
        "serve", "--max-concurrent-calls", "3", "--max-streams", "5", "--max-streams-per-connection", "2",
        "--stream-idle-seconds", "1.5", "--max-deadline", "7", "--max-concurrent-rpcs", "0",
        "--max-inflight-request-bytes", "4096"])
    limits = cli._limits(args)
    assert (limits.max_concurrent_calls, limits.max_streams, limits.max_streams_per_connection, limits.stream_idle_s,
            limits.max_deadline_s, limits.max_concurrent_rpcs, limits.max_inflight_request_bytes) == (
        3, 5, 2, 1.5, 7.0, 0, 4096)


def test_defaults_leave_room_for_health() -> None:
    d = Limits()
    assert (d.max_concurrent_calls, d.max_streams, d.max_streams_per_connection, d.stream_idle_s) == (
        1024, 1024, 128, 300.0)
    # gRPC's own limit counts health checks too: compute RPCs alone must never fill it.
    assert d.max_concurrent_rpcs > d.max_concurrent_calls + d.max_streams
    assert cli._limits(cli.build_parser().parse_args(["serve"])) == d


def test_loading_flags_fill_loading_config() -> None:
    parser = cli.build_parser()
    assert cli._loading(parser.parse_args(["serve"])) == LoadingConfig()
    args = parser.parse_args(["serve", "--loader-niceness", "0", "--loading-switch-interval-us", "250"])
    assert cli._loading(args) == LoadingConfig(niceness=0, switch_interval_us=250)
