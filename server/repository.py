"""The model repository: finds models, loads them safely, keeps versions and their states.

Every version moves LOADING -> READY (or FAILED) -> UNLOADING -> gone. Only READY versions take
traffic; version 0 in a request means the highest READY version. Listeners (health, logs) are
told of every state change.
"""
from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from gradserve.server import demo
from gradserve.server.config import EngineConfig, ServerConfig
from gradserve.server.engine import CompiledModel
from gradserve.server.errors import NotFoundError, UnavailableError
from gradserve.server.modelfn import ModelFunction, from_keras

__all__ = ["ModelState", "ModelVersion", "ModelRepository"]

_log = logging.getLogger("gradserve.server")


class ModelState(enum.Enum):
    LOADING = 1
    READY = 2
    FAILED = 3
    UNLOADING = 4


@dataclass
class ModelVersion:
    """One version of one model and, once loaded, its compiled engine."""

    name: str
    version: int
    source: str
    state: ModelState = ModelState.LOADING
    message: str = ""
    engine: CompiledModel | None = None

    @property
    def model(self) -> ModelFunction:
        assert self.engine is not None
        return self.engine.model


Listener = Callable[[ModelVersion], None]


@dataclass
class _Entry:
    versions: dict[int, ModelVersion] = field(default_factory=dict)


class ModelRepository:
    """Thread-safe registry of model versions."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._models: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    # -- queries ----------------------------------------------------------------------------------
    def get(self, name: str, version: int = 0) -> ModelVersion:
        """A READY version (0: the highest). NOT_FOUND or UNAVAILABLE otherwise."""
        with self._lock:
            entry = self._models.get(name)
            if entry is None:
                raise NotFoundError(f"model: unknown model {name!r}")
            if version:
                mv = entry.versions.get(version)
                if mv is None:
                    raise NotFoundError(f"version: model {name!r} has no version {version}")
                if mv.state is not ModelState.READY:
                    raise UnavailableError(f"version: model {name!r} version {version} is {mv.state.name}")
                return mv
            ready = [v for k, v in sorted(entry.versions.items()) if v.state is ModelState.READY]
        if not ready:
            raise UnavailableError(f"model: {name!r} has no READY version yet")
        return ready[-1]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def versions(self, name: str) -> list[ModelVersion]:
        with self._lock:
            entry = self._models.get(name)
            if entry is None:
                raise NotFoundError(f"name: unknown model {name!r}")
            return [v for _, v in sorted(entry.versions.items())]

    def ready(self, name: str) -> bool:
        with self._lock:
            entry = self._models.get(name)
            return entry is not None and any(v.state is ModelState.READY for v in entry.versions.values())

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- loading ----------------------------------------------------------------------------------
    def load_configured(self) -> None:
        """Load what the configuration names: --model sources, or the demo models."""
        for src in self.config.models:
            self.load(src.name, 1, src.path, lambda p=src.path: load_keras(p, self.config.trust_model_code))
        if self.config.demo_models:
            for name, build in demo.DEMO_MODELS.items():
                self.load(name, 1, f"builtin:{name}", build)

    def load(self, name: str, version: int, source: str, build: Callable[[], Any]) -> ModelVersion:
        """Build, compile and warm up one version; it takes traffic only once READY."""
        mv = ModelVersion(name, version, source)
        with self._lock:
            self._models.setdefault(name, _Entry()).versions[version] = mv
        self._notify(mv)
        try:
            keras_model = build()
            engine = CompiledModel(from_keras(keras_model), self.config.engine,
                                   xla=self.config.engine.xla == "on")
            if self.config.engine.warmup:
                warm_up(engine, self.config.engine)
            mv.engine = engine
            mv.state = ModelState.READY
            _log.info("model %s version %d READY (%s)", name, version, source)
        except Exception as exc:  # noqa: BLE001 - a bad model must not take the server down
            mv.state = ModelState.FAILED
            mv.message = _load_message(exc)
            _log.error("model %s version %d FAILED: %s", name, version, mv.message)
        self._notify(mv)
        return mv

    def _notify(self, mv: ModelVersion) -> None:
        for listener in self._listeners:
            listener(mv)


def _load_message(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 900 else text[:900] + "..."


def load_keras(path: str, trust_model_code: bool) -> Any:
    """Load a .keras file; Lambda layers and other code-running content need trust_model_code."""
    import keras

    return keras.saving.load_model(path, compile=False, safe_mode=not trust_model_code)


def warm_up(engine: CompiledModel, config: EngineConfig) -> None:
    """Trace predict and the default gradient, and run them at the smallest and largest bucket."""
    from gradserve.server import methods
    from gradserve.server.config import Limits
    from gradserve.server.spec import ComputeSpec, TargetSpec

    model = engine.model
    for rows in sorted({engine.buckets[0], engine.buckets[-1]}):
        inputs = {s.name: np.zeros((rows,) + tuple(1 if d is None else d for d in s.shape[1:]), s.dtype)
                  for s in model.inputs}
        wrt = tuple(s.name for s in model.inputs if s.differentiable)
        engine.run(methods.get("predict").plan(ComputeSpec("", 0, "predict", inputs, rows), model, Limits()))
        if wrt:
            spec = ComputeSpec("", 0, "gradient", inputs, rows, TargetSpec(model.outputs[0].name), wrt)
            engine.run(methods.get("gradient").plan(spec, model, Limits()))
