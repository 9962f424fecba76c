"""Authentication against live servers: TLS, mutual TLS and bearer tokens; health stays open.

Certificates are made here with the ``cryptography`` package: one CA signs the server's and a
client's certificate; a second, unrelated CA signs an impostor client certificate.
"""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve import _codec
from gradserve.v1 import model_service_pb2, model_service_pb2_grpc
from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc

TOKEN = "s3cret-token-for-tests"
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool = False, server: bool = False) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """PEM files and bytes: a CA, the server and a client it signed, an impostor client."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key, client_key, impostor_key = (_key() for _ in range(5))
    out: dict[str, Any] = {
        "ca": _cert("test ca", ca_key, "test ca", ca_key, ca=True),
        "server_cert": _cert("localhost", server_key, "test ca", ca_key, server=True),
        "server_key": _pem(server_key),
        "client_cert": _cert("client", client_key, "test ca", ca_key),
        "client_key": _pem(client_key),
        "impostor_cert": _cert("impostor", impostor_key, "other ca", other_key),
        "impostor_key": _pem(impostor_key),
    }
    for name, data in list(out.items()):
        (d / f"{name}.pem").write_bytes(data)
        out[f"{name}_path"] = str(d / f"{name}.pem")
    tokens = d / "tokens.txt"
    tokens.write_text(f"# accepted tokens\n\nanother-token\n  {TOKEN}  \n")
    out["tokens_path"] = str(tokens)
    return out


def _dense2_server(start_server: Callable[..., Any], **config: Any) -> Any:
    from gradserve.server.config import ServerConfig
    from gradserve.server.models import demo

    return start_server(ServerConfig(**config), models={"dense2": demo.build_dense2})


@pytest.fixture(scope="module")
def tls_token_server(start_server: Callable[..., Any], pki: dict[str, Any]) -> Any:
    return _dense2_server(start_server, tls_cert=pki["server_cert_path"], tls_key=pki["server_key_path"],
                          auth_token_file=pki["tokens_path"])


@pytest.fixture(scope="module")
def mtls_server(start_server: Callable[..., Any], pki: dict[str, Any]) -> Any:
    return _dense2_server(start_server, tls_cert=pki["server_cert_path"], tls_key=pki["server_key_path"],
                          tls_client_ca=pki["ca_path"])


def _tls(pki: dict[str, Any], client: str | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki["ca"])
    return grpc.ssl_channel_credentials(root_certificates=pki["ca"], private_key=pki[f"{client}_key"],
                                        certificate_chain=pki[f"{client}_cert"])


def _request() -> pb.ComputeRequest:
    req = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT)
    _codec.encode(X, out=req.inputs["input"])
    return req


def test_tls_with_token_serves(tls_token_server: Any, pki: dict[str, Any]) -> None:
    with gradserve.Client(tls_token_server.address, credentials=_tls(pki), token=TOKEN, timeout=60) as c:
        np.testing.assert_allclose(c.gradient("dense2", X), np.full((2, 4), 0.5), rtol=1e-6)
        assert "dense2" in [m.name for m in c.models()]


@pytest.mark.parametrize("metadata", [
    (),
    (("authorization", "Bearer wrong-token"),),
    (("authorization", f"Basic {TOKEN}"),),
    (("authorization", f"Bearer {TOKEN}x"),),
    (("authorization", f"Bearer {TOKEN[:-1]}"),),
    (("authorization", "Bearer "),),
    (("x-api-key", TOKEN),),
], ids=["none", "wrong", "basic-scheme", "longer", "prefix", "empty", "other-header"])
def test_missing_or_wrong_token_is_unauthenticated(tls_token_server: Any, pki: dict[str, Any],
                                                    metadata: tuple[tuple[str, str], ...]) -> None:
    with grpc.secure_channel(tls_token_server.address, _tls(pki)) as ch:
        calls = [
            lambda: pb_grpc.SensitivityServiceStub(ch).Compute(_request(), metadata=metadata, timeout=60),
            lambda: list(pb_grpc.SensitivityServiceStub(ch).ComputeStream(
                iter([pb.ComputeStreamRequest(request=_request())]), metadata=metadata, timeout=60)),
            lambda: model_service_pb2_grpc.ModelServiceStub(ch).ListModels(model_service_pb2.ListModelsRequest(),
                                                                           metadata=metadata, timeout=60),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN not in (info.value.details() or "")
        # The health service stays open to probes without a token.
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=60)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_sdk_raises_unauthenticated(tls_token_server: Any, pki: dict[str, Any]) -> None:
    with gradserve.Client(tls_token_server.address, credentials=_tls(pki), token="nope", timeout=60) as c:
        with pytest.raises(gradserve.Unauthenticated):
            c.gradient("dense2", X)


def test_plaintext_client_cannot_reach_tls_server(tls_token_server: Any) -> None:
    with grpc.insecure_channel(tls_token_server.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.SensitivityServiceStub(ch).Compute(_request(), metadata=(("authorization", f"Bearer {TOKEN}"),),
                                                       timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_accepts_client_signed_by_the_ca(mtls_server: Any, pki: dict[str, Any]) -> None:
    with gradserve.Client(mtls_server.address, credentials=_tls(pki, "client"), timeout=60) as c:
        np.testing.assert_allclose(c.gradient("dense2", X), np.full((2, 4), 0.5), rtol=1e-6)


@pytest.mark.parametrize("client", [None, "impostor"], ids=["no-client-cert", "other-ca"])
def test_mutual_tls_refuses_other_clients(mtls_server: Any, pki: dict[str, Any], client: str | None) -> None:
    with grpc.secure_channel(mtls_server.address, _tls(pki, client)) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.SensitivityServiceStub(ch).Compute(_request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bad_credential_options_fail_at_start(pki: dict[str, Any], tmp_path: Path) -> None:
    from gradserve.server.ops import auth

    with pytest.raises(auth.CredentialsError, match="go together"):
        auth.server_credentials(pki["server_cert_path"], None)
    with pytest.raises(auth.CredentialsError, match="needs --tls-cert"):
        auth.server_credentials(None, None, pki["ca_path"])
    with pytest.raises(auth.CredentialsError, match="cannot read"):
        auth.server_credentials(str(tmp_path / "missing.pem"), pki["server_key_path"])
    empty = tmp_path / "empty.txt"
    empty.write_text("# no tokens here\n\n")
    with pytest.raises(auth.CredentialsError, match="holds no token"):
        auth.read_tokens(str(empty))
    assert auth.read_tokens(pki["tokens_path"]) == ["another-token", TOKEN]
