"""With --auth-token-file, per-model health names need a token: an unauthenticated caller cannot
tell which model names exist. The overall "" service and the gRPC service names stay open to
probes. Checked with the stock grpc.health.v1 client, Check and Watch, with and without a token."""
from __future__ import annotations

from typing import Any, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

TOKEN = "health-test-token"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OPEN_NAMES = ("", "gradserve.v1.SensitivityService", "gradserve.v1.ModelService")


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from gradserve.server.config import EngineConfig, ModelSource, ServerConfig

    folder = tmp_path_factory.mktemp("auth-health")
    tokens = folder / "tokens.txt"
    tokens.write_text(f"{TOKEN}\n")
    # The demo models (dense2 among them) and "broken", a known name that is FAILED.
    cfg = ServerConfig(auth_token_file=str(tokens), demo_models=True,
                       models=(ModelSource("broken", str(folder / "missing.keras")),),
                       engine=EngineConfig(xla="off", max_bucket=2))
    return start_server(cfg)


def _check(address: str, service: str, token: str | None) -> Any:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                     metadata=metadata, timeout=30).status


def _watch_first(address: str, service: str, token: str | None) -> Any:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    with grpc.insecure_channel(address) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=service),
                                                      metadata=metadata, timeout=30)
        try:
            return next(stream).status
        finally:
            stream.cancel()


@pytest.mark.parametrize("service", OPEN_NAMES)
def test_overall_and_service_names_stay_open(server: Any, service: str) -> None:
    assert _check(server.address, service, None) == SERVING
    assert _check(server.address, service, "wrong") == SERVING
    assert _watch_first(server.address, service, None) == SERVING


@pytest.mark.parametrize("token", [None, "wrong", TOKEN[:-1]], ids=["none", "wrong", "prefix"])
@pytest.mark.parametrize("rpc", [_check, _watch_first], ids=["Check", "Watch"])
def test_model_names_need_a_token(server: Any, token: str | None, rpc: Callable[..., Any]) -> None:
    """A served, a failed and an unknown name all answer the same UNAUTHENTICATED."""
    answers = []
    for service in ("dense2", "broken", "no-such-model"):
        with pytest.raises(grpc.RpcError) as info:
            rpc(server.address, service, token)
        answers.append((info.value.code(), info.value.details()))
    assert answers[0][0] == grpc.StatusCode.UNAUTHENTICATED
    assert answers[0] == answers[1] == answers[2]


def test_model_names_with_a_token(server: Any) -> None:
    assert _check(server.address, "dense2", TOKEN) == SERVING
    assert _watch_first(server.address, "dense2", TOKEN) == SERVING
    assert _check(server.address, "broken", TOKEN) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        _check(server.address, "no-such-model", TOKEN)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
