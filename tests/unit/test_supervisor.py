"""The supervisor's pure parts: ``--workers`` parsing and the restart backoff."""
from __future__ import annotations

import os

import pytest

from gradserve.server.process.cli import build_parser
from gradserve.server.process.supervisor import RestartPolicy, worker_count


def test_worker_count_parses_numbers_and_auto() -> None:
    assert worker_count("1") == 1 and worker_count("7") == 7
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert worker_count("auto") == cores
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(ValueError, match="positive number of workers"):
            worker_count(bad)


def test_serve_rejects_zero_workers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--workers", "0"])
    assert exc.value.code == 2 and "positive number of workers" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--workers", "3", "--workers", "1"])
    assert args.workers == 1 and args.worker_index is None   # the last value wins (worker command lines)


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(initial_backoff_s=0.5, max_backoff_s=4.0)
    assert [policy.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
