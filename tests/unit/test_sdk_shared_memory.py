"""The SDK's shared-memory segments (``gradserve._shm``) on real /dev/shm objects: creation, reuse,
unlinking, leftovers of killed processes, and a call laid out in a segment and read back through
the server's own registry (no sockets: the wire is the messages)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gradserve import _shm
from gradserve._exceptions import Internal
from gradserve._options import ComputeOptions
from gradserve._requests import plan_call
from gradserve.server.frontends.shared_memory import CHALLENGE_BYTES, SharedMemoryRegistry
from gradserve.v1 import sensitivity_service_pb2 as _pb2

pytestmark = pytest.mark.skipif(not _shm.available(), reason="POSIX shared memory lives in /dev/shm (Linux)")


def _path(seg: _shm.Segment) -> str:
    return os.path.join(_shm.SHM_DIR, seg.key[1:])


def test_a_segment_is_allocated_locked_and_unlinked_once_registered() -> None:
    seg = _shm.Segment(1 << 20)
    try:
        assert seg.key.startswith(f"/gradserve-{os.getpid()}-") and os.path.exists(_path(seg))
        assert os.stat(_path(seg)).st_size == 1 << 20 and oct(os.stat(_path(seg)).st_mode & 0o777) == "0o600"
        assert _shm.sweep_orphans(min_age_s=0) == []   # locked: alive
        seg.registered("session", "region")
        assert not os.path.exists(_path(seg))
        seg.array(np.dtype(np.float32), (4,), 64)[:] = 1.5   # the mapping outlives the name
        assert seg.array(np.dtype(np.float32), (4,), 64).tolist() == [1.5] * 4
    finally:
        seg.close()


def test_leftovers_of_a_killed_process_are_swept() -> None:
    code = textwrap.dedent("""
        import os, sys
        from gradserve import _shm
        seg = _shm.Segment(4096)
        print(seg.key, flush=True)
        sys.stdin.read()
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with child:
        key = child.stdout.readline().strip()  # type: ignore[union-attr]
        path = os.path.join(_shm.SHM_DIR, key[1:])
        assert os.path.exists(path)
        assert key[1:] not in _shm.sweep_orphans(min_age_s=0)   # its creator holds it
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        assert key[1:] not in _shm.sweep_orphans(min_age_s=3600)   # "too young": it may be one being created
        assert key[1:] in _shm.sweep_orphans(min_age_s=0)
        assert not os.path.exists(path)


def test_the_pool_reuses_segments_and_keeps_few() -> None:
    pool = _shm.SegmentPool(max_idle=1)
    a = pool.take(3 << 20, None)
    a.registered("s", "ra")
    assert a.size == 3 << 20
    pool.give_back(a)
    assert pool.take(2 << 20, "s") is a   # large enough: reused
    b = pool.take(1 << 20, "s")           # a is busy: a new one
    b.registered("s", "rb")
    pool.give_back(a)
    pool.give_back(b)                     # two idle, one kept: the smaller goes
    assert pool.segments() == [a]
    assert b.map.closed
    pool.forget_session("other")          # a belongs to an ended session now
    assert pool.segments() == [] and a.map.closed
    c = pool.take(5 << 20, None)
    pool.close()
    assert not os.path.exists(_path(c))   # in use: unlinked at close, unmapped when given back
    pool.give_back(c)
    assert c.map.closed
    with pytest.raises(ValueError, match="closed"):
        pool.take(1, None)


def test_sizes_are_rounded_for_reuse() -> None:
    assert _shm._rounded(1) == 1 << 20
    assert _shm._rounded(256 << 20) == 256 << 20
    big = _shm._rounded((512 << 20) + 64)
    assert (512 << 20) + 64 <= big <= (512 << 20) * 9 // 8


def test_a_call_laid_out_in_a_segment_round_trips_through_the_registry() -> None:
    """What the server reads is the caller's array, what it writes comes back; other tensors inline."""
    registry = SharedMemoryRegistry()
    session = registry.open_session()
    core = _shm.SharedMemoryCore(threshold=0)
    x = np.arange(24, dtype=">f4").reshape(6, 4)   # big endian: converted while written
    call = plan_call(None, "dense2", ComputeOptions("gradient"), x)
    assert core.eligible(call)
    seg = core.pool.take(core.segment_size(call), session.id)
    seg.write_challenge(session.challenge)
    seg.registered(session.id, registry.register_session_region(session.id, seg.key, seg.size))
    request = core.encode(call, seg)
    assert request.inputs["input"].data == b"" and request.model == "dense2"
    where = request.inputs["input"].shared_memory
    assert (where.region, where.offset, where.byte_size) == (seg.region, _shm.HEADER, x.nbytes)
    area = request.response_shared_memory
    assert area.offset % _shm.ALIGN == 0 and area.offset + area.byte_size == seg.size
    # The server's side, through its registry: read the input, write the answer after it.
    response = _pb2.ComputeResponse(model="dense2", version=1)
    with registry.borrow(native=True) as use:
        seen = np.frombuffer(use.view(where.region, where.offset, where.byte_size, "inputs"), "<f4").reshape(6, 4)
        np.testing.assert_array_equal(seen, x)
        gradient = np.frombuffer(use.view(area.region, area.offset, x.nbytes, "attributions"), "<f4").reshape(6, 4)
        gradient[:] = 0.5
        del seen, gradient
    out = response.attributions["input"]
    out.dtype, out.shape[:] = 1, [6, 4]
    out.shared_memory.region, out.shared_memory.offset, out.shared_memory.byte_size = area.region, area.offset, 96
    response.extras["delta"].dtype = 1
    response.extras["delta"].shape.append(2)
    response.extras["delta"].data = np.array([1, 2], "<f4").tobytes()
    result = core.decode(response.SerializeToString(), seg)
    np.testing.assert_array_equal(result.attributions["input"], np.full((6, 4), 0.5, np.float32))
    assert result.attributions["input"].flags.writeable   # a copy: the segment is reused next call
    np.testing.assert_array_equal(result.extras["delta"], [1, 2])
    # A range outside the call's segment is refused, not read.
    out.shared_memory.offset = seg.size - 8
    with pytest.raises(Internal, match="not a range of this call's segment"):
        core.decode(response.SerializeToString(), seg)
    core.pool.give_back(seg)
    registry.close_session(session.id)
    core.close()
    assert registry.regions == 0 and seg.map.closed


def test_threshold_and_whole_calls_only() -> None:
    core = _shm.SharedMemoryCore(threshold=1024, max_rows=64)
    small = plan_call(None, "m", ComputeOptions("predict"), np.zeros((2, 4), np.float32))
    large = plan_call(None, "m", ComputeOptions("predict"), np.zeros((64, 4), np.float32))
    too_many_rows = plan_call(None, "m", ComputeOptions("predict"), np.zeros((65, 4), np.float32))
    assert not core.eligible(small) and core.eligible(large) and not core.eligible(too_many_rows)
    too_many_elements = plan_call(None, "m", ComputeOptions("predict"),
                                  np.broadcast_to(np.float32(0), (1, _shm.MAX_ELEMENTS + 1)))
    assert not core.eligible(too_many_elements)
    core.give_up(60.0)
    assert not core.eligible(large) and core.fell_back == 1
    core.close()
    assert not core.eligible(large)
    with pytest.raises(ValueError, match="threshold"):
        _shm.SharedMemoryCore(threshold=-1)


def test_the_challenge_fits_the_header() -> None:
    assert CHALLENGE_BYTES <= _shm.HEADER and _shm.HEADER % _shm.ALIGN == 0
