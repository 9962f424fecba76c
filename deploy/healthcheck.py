#!/usr/bin/env python3
"""Exit 0 when the gradserve server answers SERVING on the gRPC health service, 1 otherwise.

The container's HEALTHCHECK (``deploy/Dockerfile``). Kubernetes probes the same service with its
built-in ``grpc`` probes and does not need this. Target: ``GRADSERVE_HEALTH_TARGET`` or the first
argument (default ``127.0.0.1:50051``); the health service needs no token, but a server started
with ``--tls-cert`` needs a TLS probe, which this plaintext check is not.
"""
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("GRADSERVE_HEALTH_TARGET", "127.0.0.1:50051")
    with grpc.insecure_channel(target) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}", file=sys.stderr)
            return 1
    print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
