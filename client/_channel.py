"""Channel construction shared by Client and AsyncClient: targets, limits and HTTP/2 options."""
from __future__ import annotations

import json
from typing import Any, Sequence

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "channel_target", "channel_options"]

#: Largest message either side sends or accepts, unless configured otherwise.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_SERVICE = "gradserve.v1.SensitivityService"


def channel_target(target: str | Sequence[str]) -> tuple[str, bool]:
    """A gRPC target string for one address or several, and whether to balance round robin.

    Several ``host:port`` addresses become one ``ipv4:``/``ipv6:`` static target where they are
    literal IPs, or need a ``dns:///`` name that resolves to all of them.
    """
    if isinstance(target, str):
        return target, target.startswith("dns:") or "," in target
    addrs = list(target)
    if len(addrs) == 1:
        return addrs[0], False
    scheme = "ipv6" if all(a.startswith("[") for a in addrs) else "ipv4"
    return f"{scheme}:{','.join(addrs)}", True


def channel_options(max_message_bytes: int, round_robin: bool, retries: int = 4) -> list[tuple[str, Any]]:
    """Channel arguments: explicit message limits, throughput-friendly HTTP/2 settings and the
    retry policy for idempotent unary calls (UNAVAILABLE only, exponential backoff)."""
    # gRPC retries a call only before any response arrived and caps attempts at 5.
    method_config: dict[str, Any] = {
        "name": [{"service": _SERVICE, "method": "Compute"}, {"service": "gradserve.v1.ModelService"}],
    }
    if retries > 0:
        method_config["retryPolicy"] = {
            "maxAttempts": min(retries, 4) + 1,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    config: dict[str, Any] = {"methodConfig": [method_config]}
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        # A request larger than the retry buffer (default 256 KiB) is never retried: buffer a whole message.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.service_config", json.dumps(config)),
        # Larger HTTP/2 windows and write buffers; BDP probing off (it shrinks windows on loopback).
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
        ("grpc.experimental.tcp_min_read_chunk_size", 1024 * 1024),
        # Reconnect soon after a server (re)starts, so that retries can reach it (default: 1s, 120s).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
