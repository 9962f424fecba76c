"""Python's cyclic garbage collector kept off the serving path once models are loaded.

A loaded TensorFlow/Keras model leaves some 400,000 objects that Python's cyclic GC tracks.
A full (generation 2) collection walks all of them: 1.1-1.8 s with the demo models on the
2-core benchmark machine, and one came every few thousand requests, so a caller now and then
waited a second (bench/run.py: a 0.66 s pause in a 3 s run, p99 of 300-700 ms at 64 clients).
Those objects live as long as their model does, so ``gc.freeze()`` moves them out of the
collector's reach when a version becomes READY (O(1), no pause); the collector then only walks
what requests allocate, and a full collection takes microseconds.

A version that is removed or failed to load leaves cyclic garbage among frozen objects, which
only a full collection frees: ``gc.unfreeze()``, one full collection and ``gc.freeze()`` run on a
daemon thread ``SETTLE_DELAY_S`` after the last such event (by then the unloading code has let
go of the version; events close together are settled once). That collection is the one pause
a removal costs, as an unfrozen heap paid every few thousand requests. When the server stops,
everything is unfrozen again.
"""
from __future__ import annotations

import gc
import logging
import threading
import time

from gradserve.server.core.models import ModelState
from gradserve.server.models.repository import ModelRepository, ModelVersion

__all__ = ["HeapKeeper", "SETTLE_DELAY_S"]

_log = logging.getLogger("gradserve.server")

#: Seconds after a version is removed (or failed) before its garbage is collected.
SETTLE_DELAY_S = 1.0


class HeapKeeper:
    """A repository listener freezing the heap when a version is READY and settling it (a full
    collection, then freezing again) after one is removed or failed (see the module docstring)."""

    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        #: Full collections run after removals (tests and logs).
        self.settled = 0

    def on_model_change(self, mv: ModelVersion) -> None:
        if mv.state is ModelState.READY:
            gc.freeze()
        elif mv.state is ModelState.FAILED or (mv.state is ModelState.UNLOADING and self._removed(mv)):
            with self._lock:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = threading.Timer(SETTLE_DELAY_S, self.settle)
                self._timer.daemon = True
                self._timer.start()

    def _removed(self, mv: ModelVersion) -> bool:
        try:
            return all(v is not mv for v in self._repository.versions(mv.name))
        except Exception:  # noqa: BLE001 - the model itself is gone
            return True

    def settle(self) -> None:
        """Collect the garbage of removed versions and freeze what is left."""
        with self._lock:
            self._timer = None
        start = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        self.settled += 1
        _log.info("heap settled after a model change: %d objects freed in %.0f ms, %d frozen", freed,
                  (time.perf_counter() - start) * 1e3, gc.get_freeze_count())

    def close(self) -> None:
        """The server stopped: its objects become collectable again (``gc.unfreeze``), so that a
        process that runs servers one after another (tests, notebooks) does not keep them."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        gc.unfreeze()
