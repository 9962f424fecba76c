"""The heap keeper: a READY model's objects are frozen out of the cyclic GC's reach, a removed
version's garbage is collected (one full collection) and the rest frozen again, and a stopped
server leaves nothing frozen."""
from __future__ import annotations

import gc
import time

from gradserve.server.compute.compiler import Compiler
from gradserve.server.config import EngineConfig, ServerConfig
from gradserve.server.core.models import ModelState
from gradserve.server.models import demo
from gradserve.server.models.repository import ModelRepository
from gradserve.server.process.heap import HeapKeeper


def _wait_for(condition, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_ready_freezes_removal_settles_and_close_unfreezes() -> None:
    config = ServerConfig(engine=EngineConfig(xla="off", max_bucket=4))
    repository = ModelRepository(config, Compiler(config.engine))
    keeper = HeapKeeper(repository)
    repository.add_listener(keeper.on_model_change)
    gc.unfreeze()
    try:
        mv = repository.load("dense2", 1, "builtin:dense2", demo.build_dense2)
        assert mv.state is ModelState.READY
        assert gc.get_freeze_count() > 0  # the model's objects are out of the collector's reach
        assert repository.unload(mv, timeout=30)
        del mv
        # A full collection after the removal frees the version's cyclic garbage, frozen until then.
        assert _wait_for(lambda: keeper.settled == 1)
        assert gc.get_freeze_count() > 0
    finally:
        keeper.close()
    assert gc.get_freeze_count() == 0
