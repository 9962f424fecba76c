"""CPU time of a server's process tree from Linux /proc, in total and by thread (bench/run.py).

``tree_cpu_seconds(pid)``: user + system seconds of a process and its descendants.
``thread_ticks(pid)``: the clock ticks of every thread of the tree, by (pid, tid), with the
thread's kernel name; ``by_thread(before, after, names, requests)`` turns two such samples into
µs of CPU per request by thread group. Python threads are named by their Python name (which the
bench servers report, ``bench/_server.py``'s ``threads`` command), pools collapsed into one
group ("gradserve-compute_0", "gradserve-compute_1" -> "gradserve-compute"); the others (gRPC's
event engine, TensorFlow's pools) by their kernel name. Elsewhere than Linux every figure is NaN.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["tree_cpu_seconds", "thread_ticks", "by_thread", "TICK_S"]

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else float("nan")
_POOL_SUFFIX = re.compile(r"(_\d+|-\d+)$")


def _stat(path: str) -> tuple[str, list[str]]:
    text = Path(path).read_text()
    return text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()


def _tree(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(_stat(f"/proc/{entry}/stat")[1][1])
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.append(child)
                todo.append(child)
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (NaN off Linux)."""
    try:
        total = 0
        for p in _tree(pid):
            try:
                f = _stat(f"/proc/{p}/stat")[1]
            except OSError:
                continue
            total += int(f[11]) + int(f[12])
        return total * TICK_S
    except (OSError, ValueError):
        return float("nan")


def thread_ticks(pid: int) -> dict[tuple[int, int], tuple[str, int]]:
    """(pid, tid) -> (kernel thread name, user + system clock ticks) of every thread of the tree."""
    out: dict[tuple[int, int], tuple[str, int]] = {}
    try:
        pids = _tree(pid)
    except OSError:
        return out
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                comm, f = _stat(f"/proc/{p}/task/{tid}/stat")
            except (OSError, ValueError):
                continue
            out[(p, int(tid))] = (comm, int(f[11]) + int(f[12]))
    return out


def group_name(pid: int, tid: int, comm: str, names: dict[int, str], root: int) -> str:
    """The group a thread's CPU is reported under (see the module docstring)."""
    prefix = "" if pid == root else "child: "
    name = names.get(tid)
    if name is None:
        return prefix + ("main thread (event loop)" if tid == pid else f"native: {comm}")
    if name == "MainThread":
        return prefix + "main thread (event loop)"
    return prefix + "py: " + _POOL_SUFFIX.sub("", name)


def by_thread(before: dict[tuple[int, int], tuple[str, int]], after: dict[tuple[int, int], tuple[str, int]],
              names: dict[int, str], root: int, requests: float) -> dict[str, dict[str, float]]:
    """Group -> {"us": µs of CPU per request, "threads": how many of its threads ran}, largest first."""
    groups: dict[str, dict[str, float]] = {}
    for key, (comm, ticks) in after.items():
        used = ticks - before.get(key, (comm, 0))[1]
        if used <= 0:
            continue
        g = groups.setdefault(group_name(key[0], key[1], comm, names, root), {"us": 0.0, "threads": 0})
        g["us"] += used * TICK_S / max(requests, 1.0) * 1e6
        g["threads"] += 1
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]["us"]))
