"""Same-host shared memory for the SDK (``Client(target, shared_memory=True)``).

A call whose inputs are large enough (``threshold`` bytes) is sent through a POSIX shared-memory
segment that the client owns instead of through the socket: the inputs are written into the
segment, the ComputeRequest names them (``Tensor.shared_memory``) and asks for the answer there
too (``response_shared_memory``), and the answer's tensors are copied out of it. Everything else
(small calls, streams, calls split in row chunks, and every call whenever shared memory is not
available) goes through the socket as before, with the same answers.

Safety, in the order a call meets it:

- The client opens one session per connection (``SharedMemoryService.OpenSession``), a stream
  the server holds open; it ends when the client closes, or its process exits or is killed,
  and the server then unregisters the session's regions.
- Each segment is registered only after the client wrote the session's challenge at its start:
  the server maps it and checks the challenge, which proves that it sees the client's memory
  (the same host) — a server elsewhere cannot, and the client falls back to the socket,
  silently, for ``RETRY_S`` before it tries again.
- The client unlinks a segment's name as soon as the server has mapped it (a mapping outlives
  the name), so ``/dev/shm`` holds nothing while the segment is in use. A process killed during
  a registration (a few milliseconds) leaves its segment behind: it holds an ``flock`` on it
  until it unlinks it, and the next client on the host removes such unlocked leftovers
  (``sweep_orphans``).
- Segments are reused across calls (a fresh one costs page allocation: about 0.2 s for 256 MiB)
  and kept at most ``max_idle`` at a time; ``close()`` and interpreter exit unlink and unmap them.

Linux only (``/dev/shm``): elsewhere ``shared_memory=True`` changes nothing.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import mmap
import os
import secrets
import sys
import threading
import time
import weakref
from typing import Any

import grpc
import numpy as np

from gradserve import _codec
from gradserve._exceptions import Internal, from_grpc_error
from gradserve._requests import Call, ComputeResult, response_row_bytes
from gradserve.v1 import sensitivity_service_pb2 as _pb2
from gradserve.v1 import shared_memory_service_pb2 as _shm_pb2
from gradserve.v1 import shared_memory_service_pb2_grpc as _shm_grpc
from gradserve.v1 import tensor_pb2 as _tensor_pb2

__all__ = ["available", "Segment", "SegmentPool", "SharedMemoryCore", "SharedMemoryTransport",
           "AsyncSharedMemoryTransport", "sweep_orphans", "DEFAULT_THRESHOLD", "SHM_DIR", "PREFIX"]

SHM_DIR = "/dev/shm"
#: Names of this SDK's segments: ``/gradserve-<pid>-<random>`` (the server refuses them over the OIP).
PREFIX = "gradserve-"
#: Bytes at a segment's start kept for the session's challenge; tensors start after them.
HEADER = 64
#: Every tensor starts at a multiple of this (what TensorFlow and LiteRT need to read it in place).
ALIGN = 64
#: Calls whose inputs have at least this many bytes go through shared memory.
DEFAULT_THRESHOLD = 1024 * 1024
#: A call goes through shared memory as one request: one whose input tensor has more elements
#: than the server's default ``--max-elements`` goes through the socket, in row chunks, instead.
MAX_ELEMENTS = 64 * 1024 * 1024
#: After shared memory failed (no session, no room, another host), calls use the socket this long.
RETRY_S = 30.0
#: A segment this old that nobody holds locked is a leftover of a killed process (``sweep_orphans``).
ORPHAN_AGE_S = 5.0
#: Seconds an UnregisterRegion of a discarded segment may take (the session's end unregisters it anyway).
UNREGISTER_TIMEOUT_S = 5.0
_TENSOR_MAPS = ("outputs", "attributions", "extras")


def available() -> bool:
    """Whether this host has POSIX shared memory the SDK can use (Linux ``/dev/shm``)."""
    return sys.platform.startswith("linux") and os.path.isdir(SHM_DIR)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _rounded(size: int) -> int:
    """``size`` rounded up to a size worth reusing: whole MiB, within 1/8 of the next power of two."""
    step = max(1 << 20, 1 << max(0, size.bit_length() - 4))
    return -(-size // step) * step


class Segment:
    """One POSIX shared-memory segment of this process: created, allocated, mapped and locked.

    ``region`` is the server's name for it once registered under ``session``; the file name is
    unlinked then (``registered``), and the mapping lives on until ``close``.
    """

    __slots__ = ("key", "size", "map", "region", "session", "_fd", "_path", "__weakref__")

    def __init__(self, size: int, shm_dir: str = SHM_DIR) -> None:
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.key, self.size = "/" + name, size
        self._path: str | None = os.path.join(shm_dir, name)
        self.region: str | None = None
        self.session: str | None = None
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._fd: int | None = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # "alive": see sweep_orphans
            os.posix_fallocate(fd, 0, size)   # ENOSPC here, not SIGBUS at the first write
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except BaseException:
            self.close()
            raise

    def write_challenge(self, challenge: bytes) -> None:
        self.map[:len(challenge)] = challenge

    def registered(self, session: str, region: str) -> None:
        """The server mapped it as ``region``: the name is no longer needed (nor left behind)."""
        self.session, self.region = session, region
        self.unlink()

    def unlink(self) -> None:
        path, fd = self._path, self._fd
        self._path = self._fd = None
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if fd is not None:
            os.close(fd)   # releases the lock; the mapping stays

    def close(self) -> None:
        """Unlink (if not yet) and unmap. Arrays still over the mapping keep it until they go."""
        self.unlink()
        self.region = self.session = None
        mapping = getattr(self, "map", None)
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass   # unmapped when the last view is collected

    def array(self, dtype: np.dtype[Any], shape: tuple[int, ...], offset: int) -> np.ndarray:
        """The segment's bytes at ``offset`` as an array (a view)."""
        return np.ndarray(shape, dtype, buffer=self.map, offset=offset)


def sweep_orphans(shm_dir: str = SHM_DIR, min_age_s: float = ORPHAN_AGE_S) -> list[str]:
    """Unlink this SDK's segments left by killed processes; returns their names.

    A live segment is locked (``flock``) by its creator until it is unlinked; one that nobody
    holds locked and that is older than ``min_age_s`` (the gap between its creation and its lock)
    belongs to nobody. Segments of other users are left alone (they cannot be opened).
    """
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(shm_dir) if n.startswith(PREFIX)]
    except OSError:
        return removed
    now = time.time()
    for name in names:
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_ctime < min_age_s:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue   # its creator is alive
                raise
            os.unlink(path)
            removed.append(name)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


class SegmentPool:
    """The segments of one client: taken for a call, given back after it, reused across calls.

    Thread-safe. At most ``max_idle`` segments are kept between calls; a call that finds none
    large enough gets a new one (and the smallest idle one is closed if that makes too many).
    """

    def __init__(self, max_idle: int = 2, shm_dir: str = SHM_DIR) -> None:
        self.max_idle = max_idle
        self._dir = shm_dir
        self._idle: list[Segment] = []
        self._busy: set[Segment] = set()
        self._lock = threading.Lock()
        self.closed = False
        _pools.add(self)

    def take(self, size: int, session: str | None) -> Segment:
        """A segment of at least ``size`` bytes, preferably one registered under ``session``."""
        with self._lock:
            if self.closed:
                raise ValueError("the client is closed")
            fits = [s for s in self._idle if s.size >= size]
            if fits:
                seg = min(fits, key=lambda s: (s.session != session, s.size))
                self._idle.remove(seg)
                self._busy.add(seg)
                return seg
        _sweep_once(self._dir)
        seg = Segment(_rounded(size), self._dir)
        with self._lock:
            self._busy.add(seg)
        return seg

    def give_back(self, seg: Segment, keep: bool = True) -> list[tuple[str, str]]:
        """A call is done with ``seg``; ``keep=False`` closes it (its session ended, or its call
        failed: the server may still be writing into it). Returns the (session, region) of each
        segment closed, for the caller to unregister."""
        closed: Segment | None = seg
        with self._lock:
            self._busy.discard(seg)
            if keep and not self.closed and seg.region is not None:
                self._idle.append(seg)
                closed = None if len(self._idle) <= self.max_idle else min(self._idle, key=lambda s: s.size)
                if closed is not None:
                    self._idle.remove(closed)
        if closed is None:
            return []
        registered = [(closed.session, closed.region)] if closed.session and closed.region else []
        closed.close()
        return registered

    def forget_session(self, session: str | None) -> None:
        """Close the idle segments registered under another session than ``session``."""
        with self._lock:
            stale = [s for s in self._idle if s.session != session]
            self._idle = [s for s in self._idle if s.session == session]
        for seg in stale:
            seg.close()

    def segments(self) -> list[Segment]:
        with self._lock:
            return list(self._idle) + list(self._busy)

    def close(self) -> None:
        """Close every segment (those in use close when their call gives them back)."""
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for seg in idle:
            seg.close()
        for seg in busy:
            seg.unlink()   # no name left behind; unmapped when given back


_pools: weakref.WeakSet[SegmentPool] = weakref.WeakSet()
_swept: set[str] = set()


def _sweep_once(shm_dir: str) -> None:
    if shm_dir not in _swept:
        _swept.add(shm_dir)
        sweep_orphans(shm_dir)


@atexit.register
def _close_pools() -> None:
    for pool in list(_pools):
        pool.close()


class _Fallback(Exception):
    """Shared memory cannot serve this call: send it through the socket."""


class SharedMemoryCore:
    """What the sync and async transports share, without I/O: which calls go through shared
    memory, the segment pool, how a call is laid out in a segment and how its answer is read.

    Parameters
    ----------
    threshold
        Calls whose inputs have at least this many bytes go through shared memory.
    max_idle
        Segments kept between calls.
    max_rows
        Most examples in one request (the client's ``max_batch_rows``): larger calls, like those
        with a tensor of more than ``MAX_ELEMENTS`` elements, go through the socket in row chunks.
    """

    def __init__(self, threshold: int = DEFAULT_THRESHOLD, max_idle: int = 2, max_rows: int = 65536) -> None:
        if threshold < 0:
            raise ValueError("shared_memory_threshold: must be 0 or more")
        self.threshold = threshold
        self.max_rows = max_rows
        self.pool = SegmentPool(max_idle)
        self.enabled = available()
        self._retry_at = 0.0
        #: Calls sent through shared memory, and calls that fell back to the socket (for tests and benches).
        self.sent = 0
        self.fell_back = 0

    def eligible(self, call: Call) -> bool:
        """Whether ``call`` should go through shared memory now."""
        if not self.enabled or self.pool.closed or not call.whole or time.monotonic() < self._retry_at:
            return False
        arrays = call.prepared.arrays.values()
        if any(a.size > MAX_ELEMENTS or (a.ndim and a.shape[0] > self.max_rows) for a in arrays):
            return False
        return sum(a.nbytes for a in arrays) >= self.threshold

    def give_up(self, seconds: float = RETRY_S) -> None:
        """Use the socket for ``seconds`` (shared memory just failed)."""
        self._retry_at = time.monotonic() + seconds
        self.fell_back += 1

    def segment_size(self, call: Call) -> int:
        """Bytes of a segment for ``call``: header, inputs, and the answer as estimated."""
        arrays = call.prepared.arrays
        size = HEADER + sum(_aligned(a.nbytes) for a in arrays.values())
        batch = next((a.shape[0] for a in arrays.values() if a.ndim), 1)
        in_bytes = sum(a.nbytes for a in arrays.values()) // max(batch, 1)
        in_elems = sum(a.size for a in arrays.values()) // max(batch, 1)
        per_row = response_row_bytes(call.options.method, call.info, in_bytes, in_elems, call.options.return_outputs)
        # An answer larger than the estimate still arrives: what does not fit comes back inline.
        return size + _aligned(per_row * batch) + 8 * ALIGN

    def encode(self, call: Call, seg: Segment) -> _pb2.ComputeRequest:
        """The request of ``call`` with its inputs written into ``seg`` (registered)."""
        assert seg.region is not None
        request = call.encode(*call.bounds[0], with_inputs=False)
        offset = HEADER
        for name, arr in call.prepared.arrays.items():
            code = _codec.dtype_to_wire(arr.dtype, f"inputs[{name!r}]")
            dtype = _codec.DTYPES[code]
            np.copyto(seg.array(dtype, arr.shape, offset), arr, casting="equiv")
            tensor = request.inputs[name]
            tensor.dtype = code
            tensor.shape.extend(arr.shape)
            tensor.shared_memory.region = seg.region
            tensor.shared_memory.offset = offset
            tensor.shared_memory.byte_size = arr.nbytes
            offset = _aligned(offset + arr.nbytes)
        area = request.response_shared_memory
        area.region, area.offset, area.byte_size = seg.region, offset, seg.size - offset
        return request

    def decode(self, buf: bytes, seg: Segment) -> ComputeResult:
        """The answer of a request made by ``encode``: tensors in ``seg`` are copied out of it."""
        try:
            resp = _pb2.ComputeResponse.FromString(buf)
        except ValueError as exc:   # protobuf's DecodeError
            raise Internal(f"response: {exc}") from None
        maps: dict[str, dict[str, np.ndarray]] = {}
        for field in _TENSOR_MAPS:
            maps[field] = {name: self._tensor(t, seg, f"{field}[{name!r}]") for name, t in getattr(resp, field).items()}
        indices = resp.target_indices
        return ComputeResult(resp.model, resp.version, resp.request_id, maps["outputs"], maps["attributions"],
                             maps["extras"], np.array(indices, dtype=np.int64) if indices else np.empty(0, np.int64))

    @staticmethod
    def _tensor(tensor: _tensor_pb2.Tensor, seg: Segment, field: str) -> np.ndarray:
        if not tensor.HasField("shared_memory"):
            try:
                return _codec.decode(tensor, field)
            except _codec.TensorError as exc:
                raise Internal(f"response: {exc}") from None
        where = tensor.shared_memory
        try:
            dtype = _codec.dtype_from_wire(tensor.dtype, field)
            shape = tuple(int(d) for d in tensor.shape)
            nbytes = _codec.element_count(shape, field) * dtype.itemsize
        except _codec.TensorError as exc:
            raise Internal(f"response: {exc}") from None
        if where.region != seg.region or where.byte_size != nbytes or where.offset + nbytes > seg.size \
                or where.offset < HEADER:
            raise Internal(f"response: {field}.shared_memory is not a range of this call's segment "
                           f"(offset {where.offset}, {where.byte_size} bytes for {nbytes})")
        return seg.array(dtype, shape, where.offset).copy()

    def close(self) -> None:
        self.pool.close()


def _region_gone(exc: grpc.RpcError) -> bool:
    """A Compute call refused because its region is gone (its session ended meanwhile)."""
    details = exc.details() if hasattr(exc, "details") else ""
    return exc.code() == grpc.StatusCode.NOT_FOUND and "shared-memory region" in (details or "")


class _SyncSession:
    """An open session: the OpenSession stream, read on a daemon thread that notices its end."""

    def __init__(self, stub: _shm_grpc.SharedMemoryServiceStub, metadata: Any, timeout: float | None) -> None:
        self.id = ""
        self.challenge = b""
        self.ended = False
        self._first = threading.Event()
        # No deadline: the stream is held for as long as the client lives.
        self._call = stub.OpenSession(_shm_pb2.OpenSessionRequest(), metadata=metadata)
        threading.Thread(target=self._read, name="gradserve-shm-session", daemon=True).start()
        if not self._first.wait(timeout) or not self.id:
            self.close()
            raise _Fallback()

    def _read(self) -> None:
        try:
            for message in self._call:
                if not self.id:
                    self.id, self.challenge = message.session_id, message.challenge
                    self._first.set()
        except grpc.RpcError:
            pass
        finally:
            self.ended = True
            self._first.set()

    def close(self) -> None:
        self.ended = True
        self._call.cancel()


class SharedMemoryTransport:
    """Sends eligible calls of a ``Client`` through shared memory (see the module docstring).

    ``send`` returns None when a call should go through the socket instead (not eligible, or
    shared memory failed: then it stays off for ``RETRY_S``); errors of the call itself are
    raised as the socket would raise them.
    """

    def __init__(self, channel: grpc.Channel, metadata: Any, core: SharedMemoryCore) -> None:
        self.core = core
        self._stub = _shm_grpc.SharedMemoryServiceStub(channel)
        self._metadata = metadata
        self._session: _SyncSession | None = None
        self._lock = threading.Lock()

    def send(self, call: Call, compute: Any, timeout: float | None) -> ComputeResult | None:
        if not self.core.eligible(call):
            return None
        try:
            session = self._open(timeout)
            seg = self._segment(session, self.core.segment_size(call), timeout)
        except (_Fallback, OSError, grpc.RpcError):
            self.core.give_up()
            return None
        # Reused only after an answer: a call that failed or timed out may still be written into.
        answered = False
        try:
            request = self.core.encode(call, seg)
            try:
                buf = compute(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if _region_gone(exc):
                    self._drop(session)
                    self.core.fell_back += 1
                    return None
                raise from_grpc_error(exc) from exc
            answered = True
            result = self.core.decode(buf, seg)
            self.core.sent += 1
            return result
        finally:
            self._unregister(self.core.pool.give_back(seg, answered and not session.ended))

    def _unregister(self, regions: list[tuple[str, str]]) -> None:
        for session_id, region in regions:
            try:
                self._stub.UnregisterRegion(_shm_pb2.UnregisterRegionRequest(session_id=session_id, region=region),
                                            timeout=UNREGISTER_TIMEOUT_S, metadata=self._metadata)
            except grpc.RpcError:
                pass   # the session is gone, or will be: the server unregisters it then

    def _open(self, timeout: float | None) -> _SyncSession:
        with self._lock:
            session = self._session
            if session is None or session.ended:
                self.core.pool.forget_session(None)
                session = self._session = _SyncSession(self._stub, self._metadata, timeout)
            return session

    def _drop(self, session: _SyncSession) -> None:
        with self._lock:
            if self._session is session:
                self._session = None
        session.close()

    def _segment(self, session: _SyncSession, size: int, timeout: float | None) -> Segment:
        seg = self.core.pool.take(size, session.id)
        if seg.session == session.id:
            return seg
        try:
            if seg.region is not None:   # registered under an ended session, and nameless now
                raise _Fallback()
            seg.write_challenge(session.challenge)
            response = self._stub.RegisterRegion(
                _shm_pb2.RegisterRegionRequest(session_id=session.id, key=seg.key, byte_size=seg.size),
                timeout=timeout, metadata=self._metadata)
            seg.registered(session.id, response.region)
            return seg
        except BaseException:
            self._unregister(self.core.pool.give_back(seg, keep=False))
            raise

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()
        self.core.close()


class _AsyncSession:
    """An open session of an ``AsyncClient``: the stream, and a task that notices its end."""

    def __init__(self, call: Any) -> None:
        self.id = ""
        self.challenge = b""
        self.ended = False
        self._call = call
        self._watch: Any = None

    @classmethod
    async def open(cls, stub: _shm_grpc.SharedMemoryServiceStub, metadata: Any,
                   timeout: float | None) -> _AsyncSession:
        import asyncio

        session = cls(stub.OpenSession(_shm_pb2.OpenSessionRequest(), metadata=metadata))
        try:
            first = await asyncio.wait_for(session._call.read(), timeout)
        except (asyncio.TimeoutError, grpc.RpcError):
            session.close()
            raise _Fallback() from None
        if first is grpc.aio.EOF:
            session.close()
            raise _Fallback()
        session.id, session.challenge = first.session_id, first.challenge
        session._watch = asyncio.ensure_future(session._until_end())
        return session

    async def _until_end(self) -> None:
        try:
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except BaseException:   # noqa: BLE001 - cancelled, or the stream failed: it ended either way
            pass
        finally:
            self.ended = True

    def close(self) -> None:
        self.ended = True
        self._call.cancel()
        if self._watch is not None:
            self._watch.cancel()


class AsyncSharedMemoryTransport:
    """The ``AsyncClient`` twin of ``SharedMemoryTransport`` (same rules, awaited I/O)."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Any, core: SharedMemoryCore) -> None:
        import asyncio

        self.core = core
        self._stub = _shm_grpc.SharedMemoryServiceStub(channel)
        self._metadata = metadata
        self._session: _AsyncSession | None = None
        self._lock = asyncio.Lock()

    async def send(self, call: Call, compute: Any, timeout: float | None) -> ComputeResult | None:
        if not self.core.eligible(call):
            return None
        try:
            session = await self._open(timeout)
            seg = await self._segment(session, self.core.segment_size(call), timeout)
        except (_Fallback, OSError, grpc.RpcError):
            self.core.give_up()
            return None
        answered = False
        try:
            request = self.core.encode(call, seg)
            try:
                buf = await compute(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if _region_gone(exc):
                    await self._drop(session)
                    self.core.fell_back += 1
                    return None
                raise from_grpc_error(exc) from exc
            answered = True
            result = self.core.decode(buf, seg)
            self.core.sent += 1
            return result
        finally:
            await self._unregister(self.core.pool.give_back(seg, answered and not session.ended))

    async def _unregister(self, regions: list[tuple[str, str]]) -> None:
        for session_id, region in regions:
            try:
                await self._stub.UnregisterRegion(
                    _shm_pb2.UnregisterRegionRequest(session_id=session_id, region=region),
                    timeout=UNREGISTER_TIMEOUT_S, metadata=self._metadata)
            except grpc.RpcError:
                pass

    async def _open(self, timeout: float | None) -> _AsyncSession:
        async with self._lock:
            session = self._session
            if session is None or session.ended:
                self.core.pool.forget_session(None)
                session = self._session = await _AsyncSession.open(self._stub, self._metadata, timeout)
            return session

    async def _drop(self, session: _AsyncSession) -> None:
        async with self._lock:
            if self._session is session:
                self._session = None
        session.close()

    async def _segment(self, session: _AsyncSession, size: int, timeout: float | None) -> Segment:
        seg = self.core.pool.take(size, session.id)
        if seg.session == session.id:
            return seg
        try:
            if seg.region is not None:
                raise _Fallback()
            seg.write_challenge(session.challenge)
            response = await self._stub.RegisterRegion(
                _shm_pb2.RegisterRegionRequest(session_id=session.id, key=seg.key, byte_size=seg.size),
                timeout=timeout, metadata=self._metadata)
            seg.registered(session.id, response.region)
            return seg
        except BaseException:
            await self._unregister(self.core.pool.give_back(seg, keep=False))
            raise

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()
        self.core.close()

