"""What every call shares, whatever its protocol.

- ``calls`` — the call envelope: deadline, cancellation, request id, admission, memory budget,
  metrics, request logs and tracing spans, used by every front-end;
- ``admission`` — limits of calls and streams; ``budget`` — request bytes in flight;
- ``metrics`` (Prometheus), ``logs`` (request ids in every record), ``tracing`` (OpenTelemetry);
- ``auth`` — TLS credentials and bearer tokens; ``status`` — domain errors to gRPC status codes.
"""
