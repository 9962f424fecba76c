"""gradserve.server: hosts TensorFlow/Keras models and serves their sensitivities.

The layers, bottom up (each imports only those before it; the architecture page of the
documentation, docs/architecture.md, walks one request through them):

- ``core`` — plain types: errors, the neutral request, specs, results, model names and states;
- ``models`` — finding, loading and versioning models;
- ``compute`` — engines, the maths of each method, the batcher and the runner;
- ``dataplane`` — ``DataPlane``: one request in, plain results out, for every protocol;
- ``ops`` — what every call shares: the call envelope, admission, metrics, logs, tracing, auth;
- ``frontends`` — the wire formats: native gRPC, the Open Inference Protocol, global sensitivity;
- ``process`` — the server's assembly, the ``serve`` command and the ``--workers`` supervisor.

``config`` holds every limit and option. ``BackgroundServer`` runs a server on its own thread
(tests, notebooks, benchmarks)::

    from gradserve.server import BackgroundServer, ServerConfig

    with BackgroundServer(ServerConfig(demo_models=True, port=0)) as server:
        print(server.address)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradserve.server.config import ServerConfig

if TYPE_CHECKING:
    from gradserve.server.process.app import BackgroundServer

__all__ = ["BackgroundServer", "ServerConfig"]


def __getattr__(name: str) -> Any:
    # The server's assembly imports gRPC and TensorFlow: only when it is asked for.
    if name == "BackgroundServer":
        from gradserve.server.process.app import BackgroundServer

        return BackgroundServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
