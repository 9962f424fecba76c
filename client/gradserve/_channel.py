"""Channel construction shared by Client and AsyncClient: targets, limits and HTTP/2 options."""
from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any, Sequence

import grpc

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "RETRYABLE_CODES", "channel_target", "channel_options"]

#: Largest message either side sends or accepts, unless configured otherwise.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Status codes after which a call is retried (the channel's retry policy below) or a stream
#: restarted (``StreamBook.restart_delay``): the server went away. CANCELLED here is the server's:
#: one that shuts down drops calls it had accepted but not started (gRPC core kills pending
#: calls at shutdown) and cancels streams still open when its grace period ends. The call never
#: ran and Compute is idempotent, so for the caller this is the server going away. A local
#: cancellation is never retried (gRPC does not retry it; streams check ``closed`` first).
RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

_SERVICE = "gradserve.v1.SensitivityService"

#: How often the SDK pings a connection while a call is open (a peer that stopped answering is
#: noticed within this plus ``grpc.keepalive_timeout_ms``). The server accepts pings this often
#: even while no data flows (a long analysis), see ``gradserve.server.process.app.server_options``.
KEEPALIVE_TIME_MS = 30_000


def _static_address(address: str) -> tuple[str, str]:
    """``(family, "ip:port")`` for a ``host:port``: IP literals as they are, host names resolved
    once here (IPv4 preferred), since gRPC's static ``ipv4:``/``ipv6:`` targets take IPs only."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target: expected host:port, got {address!r}")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ValueError(f"target: cannot resolve {host!r}: {exc}") from None
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        ip = ipaddress.ip_address(str(infos[0][4][0]))
    if ip.version == 6:
        return "ipv6", f"[{ip}]:{port}"
    return "ipv4", f"{ip}:{port}"


def channel_target(target: str | Sequence[str]) -> tuple[str, bool]:
    """A gRPC target string for one address or several, and whether to balance round robin.

    One string is used as it is (``dns:///name:port`` resolves to every address of the name and
    is balanced round robin). Several ``host:port`` addresses become one static ``ipv4:`` or
    ``ipv6:`` target, balanced round robin.
    """
    if isinstance(target, str):
        if "," in target and ":///" not in target and not target.startswith(("ipv4:", "ipv6:")):
            target = target.split(",")   # "h1:50051,h2:50051"
        else:
            return target, target.startswith("dns:") or (target.startswith(("ipv4:", "ipv6:")) and "," in target)
    addrs = [a.strip() for a in target if a.strip()]
    if not addrs:
        raise ValueError("target: no address given")
    if len(addrs) == 1:
        return addrs[0], False
    resolved = [_static_address(a) for a in addrs]
    families = {family for family, _ in resolved}
    if len(families) > 1:
        raise ValueError("target: mix of IPv4 and IPv6 addresses; use one family or a dns:/// name")
    return f"{families.pop()}:{','.join(addr for _, addr in resolved)}", True


def channel_options(max_message_bytes: int, round_robin: bool, retries: int = 4) -> list[tuple[str, Any]]:
    """Channel arguments: explicit message limits, throughput-friendly HTTP/2 settings, the
    retry policy for idempotent unary calls (a server gone away, exponential backoff) and, over
    several servers, waiting for a ready one.

    Over several servers (``round_robin``) every call waits, within its deadline, for a server
    that is connected and reports SERVING, instead of failing at once with UNAVAILABLE
    ("connections to all backends failing") while none is: during a rolling restart the last
    serving replica may leave while the one that came back still loads its models, or while this
    client still waits out a reconnect backoff to it. ``retries=0`` keeps calls fail-fast. To
    one address calls fail fast (after their retries): a single server down is an outage the
    caller hears about at once rather than at its deadline.
    """
    # gRPC retries a call only before any response arrived and caps attempts at 5.
    method_config: dict[str, Any] = {
        "name": [{"service": _SERVICE, "method": "Compute"}, {"service": "gradserve.v1.ModelService"}],
    }
    wait_for_ready = round_robin and retries > 0
    if retries > 0:
        method_config["retryPolicy"] = {
            "maxAttempts": min(retries, 4) + 1,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": sorted(code.name for code in RETRYABLE_CODES),
        }
    config: dict[str, Any] = {"methodConfig": [method_config]}
    if wait_for_ready:
        method_config["waitForReady"] = True
        config["methodConfig"].append({"name": [{"service": _SERVICE, "method": "ComputeStream"},
                                                {"service": "gradserve.v1.GlobalSensitivityService"}],
                                       "waitForReady": True})
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        # Client-side health checking: a server that reports NOT_SERVING on the health service
        # (loading its models, or draining after SIGTERM) gets no new calls while others can
        # take them. A server without a health service counts as healthy.
        config["healthCheckConfig"] = {"serviceName": ""}
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        # A request larger than the retry buffer (default 256 KiB) is never retried: buffer a whole message.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.service_config", json.dumps(config)),
        # The retry and balancing policy above is ours: never replaced by one found in DNS TXT records.
        ("grpc.service_config_disable_resolution", 1),
        # Larger HTTP/2 windows and write buffers; BDP probing off (it shrinks windows on loopback).
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
        ("grpc.experimental.tcp_min_read_chunk_size", 1024 * 1024),
        # Reconnect soon after a server (re)starts, so that retries can reach it (default: 1s, 120s).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
