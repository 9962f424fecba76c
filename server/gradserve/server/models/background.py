"""Loading beside serving: what keeps a model that serves at its latency while others load.

Loading a model (building it, tracing its functions, XLA's timing, the LiteRT conversion, the
warm-up) is seconds of CPU, most of it Python holding the GIL, in the same process as the event
loop that answers the models already READY. Measured (``bench/loading.py``), the serving model's
requests lose time to it in three ways, and each has its remedy here:

- **The GIL.** A thread that wants the GIL asks the holder to drop it and waits up to the switch
  interval (5 ms by default) for it; the event loop asks several times per request. While a
  load runs (``loading()``), the interval is ``LoadingConfig.switch_interval_us`` (restored when
  the last load ends): the loader hands the GIL over sooner, and a request waits less for it.
- **The cyclic collector.** A full collection walks every tracked object: after importing
  TensorFlow and Keras, ~400,000 of them, 0.5-0.9 s with the GIL held on a busy 2-core machine,
  on whichever thread allocation happened to trigger it (the event loop's too). Loading makes
  many long-lived objects, so it triggers full collections. ``prepare()`` freezes the heap
  (``gc.freeze``, no pause) before the first model loads, so that later collections walk the
  models' objects only (~10,000; 10-20 ms). (The imported modules' objects live as long as the
  process; freshly imported, the heap holds no garbage to collect first.)
- **The CPU.** The loader runs on a thread of its own (``start``), and once a model serves
  (``yield_cpu``, which the server calls when a model turns READY while it listens) at lower
  priority where the OS allows it (Linux: a per-thread nice value, ``LoadingConfig.niceness``), which the
  threads it starts later (XLA's and MLIR's compiler threads) inherit. Until then nothing is
  served and the first model loads at full speed. TensorFlow's own thread pools are created
  before, at normal priority (``prepare()``), because serving calls run on them too. (SCHED_IDLE
  was measured and rejected: a loader that holds the GIL and gets no CPU stalls everything that
  waits for the GIL.)

Not remedied: TFLite's converter (``compute.litert.convert``) runs in C++ holding the GIL, ~0.1 s
per converted function (three per model): the longest waits left while a model loads. TensorFlow's
intra-op pool does next to nothing while the demo models load (0.03 s of CPU), so it is not
bounded. None of this changes where models run: device placement is the engine's (``--device``).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import logging
import os
import sys
import threading
from typing import Callable, Iterator, TypeVar

from gradserve.server.config import LoadingConfig

__all__ = ["configure", "settings", "loading", "lower_thread_priority", "name_thread", "prepare", "start",
           "yield_cpu"]

_log = logging.getLogger("gradserve.server")
T = TypeVar("T")

_lock = threading.Lock()
_local = threading.local()
_settings = LoadingConfig()
_active = 0
#: The switch interval to restore when the last load ends; None: ``loading`` left it alone.
_saved_interval: float | None = None
_prepared = False


def configure(settings: LoadingConfig) -> None:
    """Use ``settings`` for the loads that start from now on (the server's ``--loader-niceness``
    and ``--loading-switch-interval-us``)."""
    global _settings
    _settings = settings


def settings() -> LoadingConfig:
    """The settings in use."""
    return _settings


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """While at least one load runs: the shorter switch interval (restored after the last one)."""
    global _active, _saved_interval
    with _lock:
        if _active == 0 and _settings.switch_interval_us > 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_interval, _settings.switch_interval_us / 1e6))
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _saved_interval is not None:
                sys.setswitchinterval(_saved_interval)
                _saved_interval = None


def lower_thread_priority(niceness: int | None = None) -> bool:
    """Lower the calling thread's CPU priority by ``niceness`` (None: the configured
    ``LoadingConfig.niceness``; Linux: the thread's own nice value; threads it starts inherit
    it). Returns whether it was lowered; elsewhere, or where
    the OS refuses, the thread keeps its priority. Use it on threads that only load: an
    unprivileged thread can never raise its priority back."""
    if niceness is None:
        niceness = _settings.niceness
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + niceness))
    except (OSError, AttributeError) as exc:
        _log.debug("loader thread keeps its priority (%s)", exc)
        return False
    return True


def yield_cpu() -> bool:
    """On a loader thread (``start``): lower its priority, once (models serve now, and the loads
    that follow must leave them the CPU). Elsewhere nothing. Returns whether it was lowered now."""
    if not getattr(_local, "loader", False) or getattr(_local, "lowered", False):
        return False
    _local.lowered = True
    return lower_thread_priority()


def name_thread(name: str) -> None:
    """Give the calling thread ``name`` (15 bytes at most) in the OS too (Linux), so that
    ``top -H`` and /proc show loading's CPU apart from serving's; threads it starts inherit it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def prepare(tensorflow: bool = True) -> None:
    """Once per process, before the first model loads: create TensorFlow's context (its thread
    pools, which serving calls use too, at the caller's priority), then freeze the heap, so that
    the collections that loading and serving trigger later skip the ~400,000 objects of the
    imported libraries. Later calls do nothing."""
    global _prepared
    with _lock:
        if _prepared:
            return
        _prepared = True
    if tensorflow:
        import tensorflow as tf

        tf.config.list_logical_devices()  # the context: devices and their thread pools
    gc.freeze()


def start(fn: Callable[[], T], name: str = "gradserve-load") -> concurrent.futures.Future[T]:
    """Run ``fn`` on a new daemon thread that only loads, after ``prepare()``; it lowers its
    priority when told to (``yield_cpu``). Returns its future."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            _local.loader = True
            prepare()
            name_thread(name)
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
