"""Authentication: TLS / mutual-TLS server credentials and a bearer-token interceptor.

Tokens travel as the standard ``authorization: Bearer <token>`` metadata and are compared in
constant time against every accepted token, so neither timing nor the order of the token file
says how much of a guess was right.

The health service stays open to probes without a token, for the overall server ("") and the
gRPC service names only: a per-model name (health reports each model under its own name) needs
a token, so that an unauthenticated caller cannot tell which model names exist. It gets the
same UNAUTHENTICATED for a served, a failed and an unknown name.
"""
from __future__ import annotations

import hmac
import inspect
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence

import grpc

__all__ = ["server_credentials", "read_tokens", "BearerTokenInterceptor", "OPEN_METHOD_PREFIXES",
           "OPEN_HEALTH_SERVICES", "CredentialsError"]

#: RPCs reachable without a token: load balancers and orchestrators probe health unauthenticated.
OPEN_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)
#: Health ``service`` names answered without a token: the whole server and the gRPC services.
OPEN_HEALTH_SERVICES: tuple[str, ...] = ("", "gradserve.v1.SensitivityService", "gradserve.v1.ModelService")
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_DENIED = "authorization: a valid 'authorization: Bearer <token>' header is required"


class CredentialsError(ValueError):
    """A TLS or token option that cannot be used (missing pair, unreadable file, no token)."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{what}: cannot read {path!r} ({exc.strerror})") from None


def server_credentials(cert: str | None, key: str | None,
                       client_ca: str | None = None) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for plaintext.

    Parameters
    ----------
    cert, key
        The server's certificate chain and private key; both or neither.
    client_ca
        CA bundle that client certificates must chain to: turns on mutual TLS (clients without a
        valid certificate are refused during the handshake).
    """
    if cert is None and key is None:
        if client_ca is not None:
            raise CredentialsError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        return None
    if cert is None or key is None:
        raise CredentialsError("--tls-cert and --tls-key go together")
    pair = [(_read(key, "--tls-key"), _read(cert, "--tls-cert"))]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=_read(client_ca, "--tls-client-ca"),
                                       require_client_auth=True)


def read_tokens(path: str) -> list[str]:
    """Accepted tokens from a file: one per line; blank lines and ``#`` comments are ignored."""
    tokens = [line.strip() for line in _read(path, "--auth-token-file").decode().splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise CredentialsError(f"--auth-token-file: {path!r} holds no token")
    return tokens


def _denied(handler: Any) -> Any:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
    kind = next(k for k in kinds if getattr(handler, k) is not None)
    return handler._replace(**{k: (deny if k == kind else None) for k in kinds})


def _open_services_only(handler: Any, open_services: frozenset[str]) -> Any:
    """``handler`` (a health Check or Watch) answering UNAUTHENTICATED for other service names.

    The service name is in the request, which an interceptor does not see: the check runs in
    the handler, before the health servicer looks the name up.
    """
    if handler.unary_unary is not None:
        check = handler.unary_unary

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request.service not in open_services:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
            return await check(request, context)

        return handler._replace(unary_unary=checked)
    if handler.unary_stream is None:
        return _denied(handler)
    watch = handler.unary_stream
    if inspect.isasyncgenfunction(watch):
        async def watched_gen(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request.service not in open_services:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
            async for response in watch(request, context):
                yield response

        return handler._replace(unary_stream=watched_gen)

    async def watched(request: Any, context: grpc.aio.ServicerContext) -> None:
        # grpc_health's aio Watch writes with ``context.write`` rather than yielding.
        if request.service not in open_services:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        await watch(request, context)

    return handler._replace(unary_stream=watched)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC outside ``open_prefixes`` that lacks an accepted bearer token.

    Parameters
    ----------
    tokens
        The accepted tokens.
    open_prefixes
        Method-name prefixes served without a token (the health service by default).
    open_health_services
        Health-check ``service`` names answered without a token; other names (the models) need
        one.
    """

    def __init__(self, tokens: Iterable[str], open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES,
                 open_health_services: Iterable[str] = OPEN_HEALTH_SERVICES) -> None:
        self._tokens = [t.encode() for t in tokens]
        if not self._tokens:
            raise CredentialsError("BearerTokenInterceptor needs at least one token")
        self._open = tuple(open_prefixes)
        self._open_health = frozenset(open_health_services)
        # Wrapped health handlers, built once per registered handler (the same object each call).
        self._health: dict[int, tuple[Any, Any]] = {}

    def accepts(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        """Whether ``metadata`` carries an accepted bearer token."""
        value: Any = ""
        for key, v in metadata or ():
            if key == "authorization":
                value = v
                break
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = str(value).partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        # Compare with every token, without stopping at a match: constant time in the tokens too.
        ok = False
        for accepted in self._tokens:
            ok |= hmac.compare_digest(given, accepted)
        return ok

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        if self.accepts(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        if not details.method.startswith(self._open):
            return _denied(handler)
        if not details.method.startswith(_HEALTH_PREFIX):
            return handler
        cached = self._health.get(id(handler))
        if cached is None or cached[0] is not handler:
            cached = (handler, _open_services_only(handler, self._open_health))
            self._health[id(handler)] = cached
        return cached[1]
