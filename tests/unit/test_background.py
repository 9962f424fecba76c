"""models.background: the switch interval while loads run, and a loader thread's priority."""
from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable

import pytest

from gradserve.server.config import LoadingConfig
from gradserve.server.models import background


def _on_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(30)
    return out[0]


def test_the_switch_interval_is_short_while_any_load_runs_and_restored_after_the_last() -> None:
    normal = sys.getswitchinterval()
    low = min(normal, background.settings().switch_interval_us / 1e6 or normal)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, float] = {}

    def first() -> None:
        with background.loading():
            first_in.set()
            assert second_in.wait(30)
        seen["first left"] = sys.getswitchinterval()
        first_out.set()

    thread = threading.Thread(target=first)
    thread.start()
    assert first_in.wait(30)
    with background.loading():  # overlaps the first load
        second_in.set()
        seen["both"] = sys.getswitchinterval()
        assert first_out.wait(30)
        seen["second alone"] = sys.getswitchinterval()
    thread.join(30)
    assert seen == {"both": low, "first left": low, "second alone": low}
    assert sys.getswitchinterval() == normal


def test_the_switch_interval_is_restored_when_a_load_fails() -> None:
    normal = sys.getswitchinterval()
    with pytest.raises(RuntimeError):
        with background.loading():
            raise RuntimeError("the build failed")
    assert sys.getswitchinterval() == normal


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_a_loader_thread_lowers_its_own_priority_only_by_the_configured_niceness() -> None:
    def lowered() -> tuple[bool, int, int]:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        return background.lower_thread_priority(), before, os.getpriority(os.PRIO_PROCESS, tid)

    saved = background.settings()
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    try:
        background.configure(LoadingConfig(niceness=3))
        done, before, after = _on_thread(lowered)
        assert done and after == min(19, before + 3) and after > before
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # not the caller's
        background.configure(LoadingConfig(niceness=0))  # --loader-niceness 0: normal priority
        done, before, after = _on_thread(lowered)
        assert not done and after == before
    finally:
        background.configure(saved)


def test_the_configured_switch_interval_is_used_and_zero_leaves_it_alone() -> None:
    saved, normal = background.settings(), sys.getswitchinterval()
    try:
        background.configure(LoadingConfig(switch_interval_us=200))
        with background.loading():
            assert sys.getswitchinterval() == pytest.approx(min(normal, 200e-6))
        assert sys.getswitchinterval() == normal
        background.configure(LoadingConfig(switch_interval_us=0))
        with background.loading():
            assert sys.getswitchinterval() == normal
    finally:
        background.configure(saved)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_yield_cpu_does_nothing_off_a_loader_thread() -> None:
    def yielded() -> tuple[bool, int, int]:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        return background.yield_cpu(), before, os.getpriority(os.PRIO_PROCESS, tid)

    done, before, after = _on_thread(yielded)
    assert not done and after == before
