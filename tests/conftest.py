"""Shared fixtures. Tiers: tests/unit (no TF, no sockets), tests/server (TF, no sockets),
tests/integration (a real server on 127.0.0.1:0 called with the real SDK), tests/e2e (the CLI
as a subprocess).

``demo_server`` is one session-wide server on the built-in demo models: prefer it over starting
your own, and start your own (``start_server``) only for a configuration it does not have.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CI has no GPU; avoids slow CUDA probing


@pytest.fixture(scope="session")
def generator_path(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """sys.path entries under which tools/gen_protos.py runs with its own grpcio-tools (installed
    into a private folder once: no extra depends on that exact version, see gen_protos)."""
    import pathlib
    import subprocess
    import sys

    tools = pathlib.Path(__file__).resolve().parents[1] / "tools"
    sys.path.insert(0, str(tools))
    try:
        import gen_protos
    finally:
        sys.path.pop(0)
    target = tmp_path_factory.mktemp("grpcio-tools")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--target", str(target), f"grpcio-tools=={gen_protos.GRPCIO_TOOLS}"],
                   check=True, capture_output=True, timeout=300)
    return [str(target), str(tools)]


@pytest.fixture(scope="session")
def start_server() -> Iterator[Callable[..., Any]]:
    """Factory: ``start_server(config=None, repository=None)`` -> a started BackgroundServer on
    127.0.0.1:0 (port chosen by the OS), stopped at the end of the session."""
    from gradserve.server.app import BackgroundServer
    from gradserve.server.config import ServerConfig

    started: list[Any] = []

    def start(config: Any = None, repository: Any = None, **overrides: Any) -> Any:
        import dataclasses

        cfg = config or ServerConfig(demo_models=repository is None)
        cfg = dataclasses.replace(cfg, host="127.0.0.1", port=0, **overrides)
        srv = BackgroundServer(cfg, repository).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop(grace=0.5)


@pytest.fixture(scope="session")
def demo_server(start_server: Callable[..., Any]) -> Any:
    """One server on the demo models (dense2, cnn, multi) for the whole session."""
    from gradserve.server.config import ServerConfig

    return start_server(ServerConfig(demo_models=True))


@pytest.fixture()
def client(demo_server: Any) -> Iterator[Any]:
    """A fresh SDK client connected to ``demo_server``."""
    import gradserve

    with gradserve.Client(demo_server.address, timeout=60) as c:
        yield c
