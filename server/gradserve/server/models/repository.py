"""The model repository: finds models, loads them safely, keeps versions and their states.

Every version moves LOADING -> READY (or FAILED) -> UNLOADING -> gone. Only READY versions take
traffic; version 0 in a request means the highest READY version, so a new version takes over
only once it is compiled and warmed up, and a version that fails to load leaves the previous
one serving. Listeners (health, logs) are told of every state change.

Sources: ``--model NAME=PATH`` (version 1), ``--model-dir DIR`` holding ``DIR/<name>/<version>/``
(one .keras file or a SavedModel) and ``DIR/<name>.keras`` (version 1), and the built-in demo
models. With ``poll_seconds`` a background thread rescans DIR: new versions are loaded, removed
ones are drained (no new requests, in-flight ones finish) and dropped.

Nothing in DIR can stop the others from loading: a version folder name that is not a canonical
positive int64 (``03``, ``²``, ``99999999999999999999``), an entry that resolves outside DIR
(unless ``follow_symlinks``) or a folder that cannot be read is skipped, with its reason logged
once (not at every rescan); an unexpected error scanning one model is logged with its traceback
and the others still load.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Mapping, Protocol

import numpy as np

from gradserve.server.config import ServerConfig
from gradserve.server.core.errors import NotFoundError, UnavailableError
from gradserve.server.core.models import ModelState, validate_model_name
from gradserve.server.core.spec import PreparedCall
from gradserve.server.models import background, demo
from gradserve.server.models.loading import KERAS_SUFFIX, ModelLoadError, device_scope, is_within, load_model
from gradserve.server.models.modelfn import ModelFunction, from_keras

__all__ = ["ModelState", "ModelVersion", "ModelRepository", "ModelDirScan", "scan", "scan_model_dir",
           "version_folder_problem", "Engine", "Compiler"]

_log = logging.getLogger("gradserve.server")

#: Where a version came from: only model-dir versions are ever unloaded by a rescan.
ORIGIN_CONFIG, ORIGIN_DIR, ORIGIN_BUILTIN = "config", "dir", "builtin"
#: Highest version number: versions are int64 on the wire.
MAX_VERSION = 2**63 - 1


class Engine(Protocol):
    """What a version keeps of its compiled model (``compute.engine.CompiledModel``): the
    repository loads models, and the ``Compiler`` it is given turns each into an engine."""

    @property
    def model(self) -> ModelFunction: ...

    @property
    def xla(self) -> bool: ...

    @property
    def device(self) -> str: ...

    @property
    def buckets(self) -> tuple[int, ...]: ...

    @property
    def trace_counts(self) -> Mapping[str, int]: ...

    @property
    def compile_counts(self) -> Mapping[str, int]: ...

    def run(self, call: PreparedCall) -> dict[str, np.ndarray]: ...

    def runs_in_litert(self, call: PreparedCall) -> bool: ...


#: Compiles (and warms up) a loaded model before its version is READY.
Compiler = Callable[[ModelFunction], Engine]



@dataclass(eq=False)
class ModelVersion:
    """One version of one model and, once loaded, its compiled engine.

    ``enter()``/``leave()`` (or ``with acquire():``) mark a request in flight on this version;
    unloading waits for the count to drop to zero. The engine is never taken away from a version
    object, so a request that picked a version just before it started unloading still completes.
    """

    name: str
    version: int
    source: str
    state: ModelState = ModelState.LOADING
    message: str = ""
    engine: Engine | None = None
    origin: str = ORIGIN_CONFIG
    #: Files (path, size, mtime) the version was loaded from; a FAILED version is retried
    #: when they change.
    fingerprint: tuple[Any, ...] = ()
    #: What the data plane keeps per kind of request on this version (checked and planned once;
    #: ``dataplane.plane``), gone with the version.
    plans: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False)
    _inflight: int = field(default=0, init=False, repr=False)
    #: Threads in ``wait_idle``: only then does the last request out take ``_idle`` to notify.
    _waiting: int = field(default=0, init=False, repr=False)
    _count: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _idle: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)

    @property
    def model(self) -> ModelFunction:
        assert self.engine is not None
        return self.engine.model

    @property
    def inflight(self) -> int:
        """Requests currently running on this version."""
        return self._inflight

    def enter(self) -> None:
        """Count one request in (``leave`` counts it out; see the class doc)."""
        with self._count:
            self._inflight += 1

    def leave(self) -> None:
        """Count a request counted in by ``enter`` out; the last one out wakes ``wait_idle``."""
        with self._count:
            self._inflight -= 1
            if self._inflight or not self._waiting:
                return
        # A waiter counted itself in ``_waiting`` under ``_idle`` before it looked at the count,
        # and waits on ``_idle`` until notified: this notify cannot come between the two.
        with self._idle:
            self._idle.notify_all()

    @contextlib.contextmanager
    def acquire(self) -> Iterator["ModelVersion"]:
        """Context manager around one request's work on this version (``enter`` and ``leave``)."""
        self.enter()
        try:
            yield self
        finally:
            self.leave()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is in flight; False if ``timeout`` passed first."""
        with self._idle:
            self._waiting += 1
            try:
                return self._idle.wait_for(lambda: self._inflight == 0, timeout)
            finally:
                self._waiting -= 1


Listener = Callable[[ModelVersion], None]


@dataclass
class _Entry:
    versions: dict[int, ModelVersion] = field(default_factory=dict)


def _fingerprint(path: str) -> tuple[Any, ...]:
    """(relative path, size, mtime) of every file under ``path``: changes while a copy is under way."""
    if os.path.isfile(path):
        st = os.stat(path)
        return (("", st.st_size, st.st_mtime_ns),)
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            full = os.path.join(root, f)
            try:
                st = os.stat(full)
            except OSError:  # removed while we walked: the next scan sees the settled tree
                continue
            found.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(found)


def version_folder_problem(name: str) -> str | None:
    """Why ``name`` cannot be a version folder, or None when it is one.

    A version folder is named by its number in one spelling only: ASCII digits, no leading zero,
    1 to 2**63-1 (``str.isdigit`` alone would take ``²``, which ``int`` refuses, and ``03``
    would alias ``3``).
    """
    if not (name.isascii() and name.isdigit()):
        return "not a version folder: a version folder name is ASCII digits only"
    if name.startswith("0"):
        if not name.strip("0"):
            return "not a version folder: versions are positive integers"
        return f"leading zero: a version is spelled one way only; name it {name.lstrip('0')!r}"
    if len(name) > 19 or int(name) > MAX_VERSION:
        return f"version past the int64 maximum {MAX_VERSION}"
    return None


@dataclass
class ModelDirScan:
    """What one scan of a model directory found."""

    #: name -> version -> path.
    models: dict[str, dict[int, str]] = field(default_factory=dict)
    #: Entries not served: path -> why.
    skipped: dict[str, str] = field(default_factory=dict)
    #: Models whose folder could not be listed this time: their loaded versions stay.
    unreadable: set[str] = field(default_factory=set)


def _scan_model_folder(name: str, path: str, out: ModelDirScan, inside: Callable[[str], bool]) -> None:
    versions: dict[int, str] = {}
    for sub in sorted(os.listdir(path)):
        if sub.startswith("."):
            continue  # staging (``.3.tmp``) and hidden files
        vpath = os.path.join(path, sub)
        problem = version_folder_problem(sub)
        if problem is None and not os.path.isdir(vpath):
            problem = "not a version folder: a file"
        if problem is None and not inside(vpath):
            problem = "resolves outside the model directory; start with --follow-symlinks to serve it"
        if problem is not None:
            out.skipped[vpath] = problem
            continue
        versions[int(sub)] = vpath
    for version, vpath in versions.items():
        out.models.setdefault(name, {}).setdefault(version, vpath)


def scan(root: str, *, follow_symlinks: bool = False) -> ModelDirScan:
    """Scan ``root`` for models: ``root/<name>/<version>/`` and ``root/<name>.keras`` (version 1).

    A ``<name>/1/`` folder wins over ``<name>.keras``. Hidden entries (a leading ``.``) are skipped
    silently, so a version can be staged as ``<name>/.3.tmp`` and renamed into place atomically;
    anything else that is not served is in ``skipped`` with the reason: invalid model names,
    version folder names that are not canonical (``version_folder_problem``), entries that
    resolve outside ``root`` unless ``follow_symlinks``. A model folder that cannot be listed is
    in ``unreadable``; an unexpected error scanning one model is logged with its traceback and
    the model skipped. Raises ``OSError`` when ``root`` itself cannot be listed (callers must not
    take that for "every model was removed").
    """
    top = os.path.realpath(root)

    def inside(path: str) -> bool:
        return follow_symlinks or is_within(os.path.realpath(path), top)

    out = ModelDirScan()
    for entry in sorted(os.listdir(root)):
        if entry.startswith("."):
            continue
        path = os.path.join(root, entry)
        is_dir = os.path.isdir(path)
        if not is_dir and not entry.endswith(KERAS_SUFFIX):
            out.skipped[path] = "not a model: neither a model folder nor a .keras file"
            continue
        name = entry if is_dir else entry[: -len(KERAS_SUFFIX)]
        try:
            try:
                validate_model_name(name)
            except Exception:  # noqa: BLE001 - a stray entry must not stop the others from loading
                out.skipped[path] = "invalid model name"
                continue
            if not inside(path):
                out.skipped[path] = "resolves outside the model directory; start with --follow-symlinks to serve it"
                continue
            if is_dir:
                _scan_model_folder(name, path, out, inside)
            else:
                out.models.setdefault(name, {}).setdefault(1, path)
        except OSError as exc:
            out.unreadable.add(name)
            out.skipped[path] = f"cannot be read ({exc.strerror or exc}); its loaded versions stay"
        except Exception as exc:  # noqa: BLE001 - one model's error must not stop the others
            _log.exception("model dir: scanning %r failed", path)
            out.skipped[path] = f"scan failed ({type(exc).__name__}: {exc})"
    return out


def scan_model_dir(root: str, *, follow_symlinks: bool = False) -> dict[str, dict[int, str]]:
    """Models in ``root``: name -> version -> path (``scan`` with each skip logged as a warning)."""
    found = scan(root, follow_symlinks=follow_symlinks)
    for path, reason in found.skipped.items():
        _log.warning("model dir: skipping %r (%s)", path, reason)
    return found.models


class ModelRepository:
    """Thread-safe registry of model versions."""

    def __init__(self, config: ServerConfig, compiler: Compiler) -> None:
        self.config = config
        self._compile = compiler
        for src in config.models:
            validate_model_name(src.name, f"--model {src.name}={src.path}")
        self._models: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        #: (name, version) -> its READY version, and (name, 0) -> the highest READY one: made anew
        #: under ``_lock`` at every change of state (``_publish``) and read without a lock by
        #: ``serving``, the path of every request.
        self._serving: dict[tuple[str, int], ModelVersion] = {}
        self._listeners: list[Listener] = []
        # (name, version) -> fingerprint seen at the previous scan: a version is loaded once its
        # files look the same on two consecutive scans (not half copied).
        self._pending: dict[tuple[str, int], tuple[Any, ...]] = {}
        self._poll_stop = threading.Event()
        self._poll_thread: threading.Thread | None = None
        self._scan_lock = threading.Lock()
        self._scan_failed = False
        # Entries the previous scan skipped (path -> reason): each skip is logged when it first
        # appears or its reason changes, not at every rescan.
        self._skipped: dict[str, str] = {}

    # -- queries ----------------------------------------------------------------------------------
    def serving(self, name: str, version: int = 0) -> ModelVersion | None:
        """The READY version ``get`` would return, or None (then ``get`` says why), with no lock
        taken and no error made: a lookup in the table of READY versions made at the last change
        of state. A version that has just left READY is not returned."""
        mv = self._serving.get((name, version))
        return mv if mv is not None and mv.state is ModelState.READY else None

    def get(self, name: str, version: int = 0) -> ModelVersion:
        """A READY version (0: the highest). INVALID_ARGUMENT, NOT_FOUND or UNAVAILABLE otherwise."""
        mv = self._serving.get((name, version))
        if mv is not None and mv.state is ModelState.READY:
            return mv
        with self._lock:
            entry = self._models.get(name)
        if entry is None:
            validate_model_name(name)  # a malformed name is INVALID_ARGUMENT, not NOT_FOUND
            raise NotFoundError(f"model: unknown model {name!r}")
        with self._lock:
            if version < 0:
                raise NotFoundError(f"version: model {name!r} has no version {version}")
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
        """Every version of ``name`` (ascending), whatever its state."""
        validate_model_name(name, "name")
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

    def _publish(self) -> None:
        """Make the table ``serving`` reads anew (with ``_lock`` held, after a change of state)."""
        table: dict[tuple[str, int], ModelVersion] = {}
        for name, entry in self._models.items():
            for version, mv in sorted(entry.versions.items()):
                if mv.state is ModelState.READY:
                    table[(name, version)] = table[(name, 0)] = mv
        self._serving = table

    # -- loading ----------------------------------------------------------------------------------
    def load_configured(self) -> None:
        """Load what the configuration names: --model sources, the model dir, or the demo models."""
        for src in self.config.models:
            self.load(src.name, 1, src.path, self._loader(src.path))
        if self.config.model_dir:
            try:
                self.poll_once(initial=True)
            except Exception:  # noqa: BLE001 - log it, and serve what did load
                _log.exception("model dir %s: the initial scan failed", self.config.model_dir)
        if self.config.demo_models:
            for name, build in demo.DEMO_MODELS.items():
                self.load(name, 1, f"builtin:{name}", build, origin=ORIGIN_BUILTIN)

    def _loader(self, path: str, confine_to: str | None = None) -> Callable[[], ModelFunction]:
        cfg = self.config
        return lambda: load_model(path, trust_model_code=cfg.trust_model_code, device=cfg.engine.device,
                                  confine_to=confine_to)

    def load(self, name: str, version: int, source: str, build: Callable[[], Any], *,
             origin: str = ORIGIN_CONFIG, fingerprint: tuple[Any, ...] = ()) -> ModelVersion:
        """Build, compile and warm up one version; it takes traffic only once READY.

        ``build`` returns a ``ModelFunction`` or a Keras model. Failures leave the version
        FAILED with a message; other versions keep serving.
        """
        mv = ModelVersion(name, version, source, origin=origin, fingerprint=fingerprint)
        with self._lock:
            self._models.setdefault(name, _Entry()).versions[version] = mv
            self._publish()  # a READY version this one replaces stops serving
        self._notify(mv)
        try:
            with background.loading():  # the GIL handed over sooner while this loads
                with device_scope(self.config.engine.device):  # variables live where the calls run
                    built = build()
                model = built if isinstance(built, ModelFunction) else from_keras(built)
                engine = self._compile(model)
            mv.engine = engine
            with self._lock:
                mv.state = ModelState.READY
                self._publish()
            _log.info("model %s version %d READY (%s, xla=%s)", name, version, source, engine.xla)
        except Exception as exc:  # noqa: BLE001 - a bad model must not take the server down
            mv.message = _load_message(exc)
            with self._lock:
                mv.state = ModelState.FAILED
                self._publish()
            _log.error("model %s version %d FAILED: %s", name, version, mv.message)
        self._notify(mv)
        return mv

    def unload(self, mv: ModelVersion, timeout: float | None = None) -> bool:
        """Stop new traffic to ``mv`` (UNLOADING), wait for its in-flight requests, remove it.

        Returns False (and leaves it UNLOADING) if requests were still running after ``timeout``.
        """
        with self._lock:
            was_unloading, mv.state = mv.state is ModelState.UNLOADING, ModelState.UNLOADING
            self._publish()
        if not was_unloading:
            self._notify(mv)
        if not mv.wait_idle(timeout):
            return False
        with self._lock:
            entry = self._models.get(mv.name)
            if entry is not None and entry.versions.get(mv.version) is mv:
                del entry.versions[mv.version]
                if not entry.versions:
                    del self._models[mv.name]
            self._publish()
        _log.info("model %s version %d unloaded", mv.name, mv.version)
        self._notify(mv)
        return True

    # -- model dir polling ------------------------------------------------------------------------
    def poll_once(self, initial: bool = False) -> None:
        """Rescan the model dir: load new (or changed FAILED) versions, unload removed ones.

        A new version found by a rescan is loaded once its files are unchanged since the previous
        scan, so a folder being copied in is not loaded half-written; ``initial`` loads at once.
        """
        root = self.config.model_dir
        if not root:
            return
        with self._scan_lock:
            try:
                result = scan(root, follow_symlinks=self.config.follow_symlinks)
            except OSError as exc:
                # An unreadable dir (unmounted, a network hiccup) unloads nothing: keep serving.
                if not self._scan_failed:
                    _log.warning("model dir %s cannot be read (%s); keeping the loaded versions", root, exc)
                self._scan_failed = True
                return
            self._scan_failed = False
            for path, reason in result.skipped.items():
                if self._skipped.get(path) != reason:
                    _log.warning("model dir: skipping %r (%s)", path, reason)
            self._skipped = result.skipped
            found = result.models
            on_disk = {(n, v) for n, vs in found.items() for v in vs}
            confine_to = None if self.config.follow_symlinks else root
            for name, versions in found.items():
                for version, path in versions.items():
                    if self._poll_stop.is_set() and not initial:
                        return
                    try:
                        self._poll_version(name, version, path, initial, confine_to)
                    except Exception:  # noqa: BLE001 - one version's error must not stop the others
                        _log.exception("model dir: %r (model %s version %d) failed", path, name, version)
            for key in [k for k in self._pending if k not in on_disk]:
                del self._pending[key]
            with self._lock:
                gone = [mv for e in self._models.values() for mv in e.versions.values()
                        if mv.origin == ORIGIN_DIR and (mv.name, mv.version) not in on_disk
                        and mv.name not in result.unreadable
                        and mv.state in (ModelState.READY, ModelState.FAILED)]
                for mv in gone:
                    mv.state = ModelState.UNLOADING  # from now on no request picks it
                self._publish()
        for mv in gone:
            self._notify(mv)
            # Drain on a thread of its own, so that a long request does not hold up the scans.
            threading.Thread(target=self.unload, args=(mv,), name=f"gradserve-drain-{mv.name}-{mv.version}",
                             daemon=True).start()

    def _poll_version(self, name: str, version: int, path: str, initial: bool, confine_to: str | None) -> None:
        """Load one version found on disk if it is new (or FAILED and changed) and settled."""
        with self._lock:
            entry = self._models.get(name)
            current = entry.versions.get(version) if entry else None
        if current is not None and (current.origin != ORIGIN_DIR or current.state is not ModelState.FAILED):
            return  # loaded, loading or draining; or a --model/builtin version wins
        fp = _fingerprint(path)
        if current is not None and current.fingerprint == fp:
            return  # FAILED and unchanged: retrying would fail again
        key = (name, version)
        if not initial and self._pending.get(key) != fp:
            self._pending[key] = fp  # look again next scan: it may still be copying
            return
        self._pending.pop(key, None)
        self.load(name, version, path, self._loader(path, confine_to), origin=ORIGIN_DIR, fingerprint=fp)

    def start_polling(self) -> None:
        """Rescan the model dir every ``config.poll_seconds`` on a background thread."""
        if not self.config.model_dir or self.config.poll_seconds <= 0 or self._poll_thread is not None:
            return
        self._poll_stop.clear()
        self._poll_thread = threading.Thread(target=self._poll_loop, name="gradserve-poll", daemon=True)
        self._poll_thread.start()

    def stop_polling(self, timeout: float | None = 10.0) -> None:
        """Stop the rescan thread (a load in progress finishes first, up to ``timeout``)."""
        self._poll_stop.set()
        thread, self._poll_thread = self._poll_thread, None
        if thread is not None:
            thread.join(timeout)

    def _poll_loop(self) -> None:
        background.name_thread("gradserve-poll")
        background.lower_thread_priority()  # this thread only scans and loads
        while not self._poll_stop.wait(self.config.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - keep polling; the next scan may succeed
                _log.exception("model dir rescan failed")

    def _notify(self, mv: ModelVersion) -> None:
        for listener in self._listeners:
            listener(mv)


def _load_message(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 900 else text[:900] + "..."
