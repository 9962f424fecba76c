"""What the tiers share. Tiers: tests/unit (no TensorFlow, no
sockets), tests/server (TensorFlow, no sockets), tests/integration (a real server on 127.0.0.1:0
called with the real SDK or a real third-party client), tests/e2e (the CLI as a subprocess).

The server fixtures serve the integration and end-to-end tiers. ``demo_server`` is one
session-wide server on the built-in demo models: prefer it over starting your own, and start your
own (``start_server``) only for a configuration it does not have.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping

import pytest

from gradserve.server.config import ServerConfig

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CI has no GPU; avoids slow CUDA probing


@pytest.fixture(scope="session")
def start_server() -> Iterator[Callable[..., Any]]:
    """Factory: ``start_server(config=None, repository=None, models=None, **overrides)`` -> a started
    BackgroundServer on 127.0.0.1:0 (port chosen by the OS), stopped at the end of the session.

    ``models`` maps names to functions that build each model (a Keras model or a
    ``ModelFunction``), served as version 1 instead of the demo models.
    """
    from gradserve.server.compute.compiler import Compiler
    from gradserve.server.models.repository import ModelRepository
    from gradserve.server.process.app import BackgroundServer

    started: list[Any] = []

    def start(config: ServerConfig | None = None, repository: Any = None,
              models: Mapping[str, Callable[[], Any]] | None = None, **overrides: Any) -> Any:
        custom = repository is not None or models is not None
        cfg = dataclasses.replace(config or ServerConfig(demo_models=not custom), host="127.0.0.1", port=0,
                                  **overrides)
        if models is not None:
            repository = ModelRepository(cfg, Compiler(cfg.engine))
            for name, build in models.items():
                repository.load(name, 1, f"test:{name}", build)
        srv = BackgroundServer(cfg, repository).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop(grace=0.5)


@pytest.fixture(scope="session")
def demo_server(start_server: Callable[..., Any]) -> Any:
    """One server on the demo models (dense2, cnn, multi) for the whole session."""
    return start_server(ServerConfig(demo_models=True))


@pytest.fixture()
def client(demo_server: Any) -> Iterator[Any]:
    """A fresh SDK client connected to ``demo_server``."""
    import gradserve

    with gradserve.Client(demo_server.address, timeout=60) as c:
        yield c


@pytest.fixture()
def log_file() -> Iterator[Callable[..., Any]]:
    """Factory: ``log_file(path)`` opens a log for a subprocess server (``w+``); closed at teardown."""
    opened: list[Any] = []

    def open_log(path: Any, **kwargs: Any) -> Any:
        log = open(path, "w+", **kwargs)
        opened.append(log)
        return log

    yield open_log
    for log in opened:
        log.close()
