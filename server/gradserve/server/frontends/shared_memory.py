"""Same-host shared memory: the server-wide registry of mapped POSIX shared-memory regions.

Both front-ends read request tensors from, and write answer tensors into, memory that a caller on
the same host shares with the server (``/dev/shm``), instead of copying them through a socket:

- the Open Inference Protocol's system shared-memory extension (Triton's): a caller registers a
  region by name, key (the POSIX object), offset and byte size (``register``), and its requests
  name it in the ``shared_memory_*`` parameters of inputs and requested outputs;
- the native ``SharedMemoryService`` (the SDK's ``shared_memory=True``): a caller opens a session
  (``open_session``), writes the session's challenge at the start of its segment and registers it
  (``register_session_region``); the challenge proves that the server sees the caller's memory
  (same host) and that the caller can write it. The session's regions go when it is closed,
  which the service does when the caller's stream ends (its process exits or is killed too).

A call holds the regions it names for as long as it uses them (``Borrowed``): a region
unregistered meanwhile loses its name at once, and is unmapped when its last call releases it,
so a call never touches unmapped memory. (Python adds a second guard: a mapping with live
views cannot be closed; it is then unmapped when the last view is collected.)

What a registered region lets a caller do is the reason shared memory is a server option
(``--shared-memory``): an OIP caller can make the server map any POSIX object its user can
open, and a caller that shrinks (``ftruncate``) an object while the server uses it crashes the
server with SIGBUS. The registry narrows the second (every use checks the object's size first)
but cannot close it; see docs/shared-memory.md.

Only system (CPU) shared memory: Triton's CUDA extension has the same shape (a name, a handle
instead of a key, a byte size), and would be a second ``kind`` of ``Region``.

No dependency above ``core`` and ``config``: the front-ends use it, it uses none of them.
"""
from __future__ import annotations

import errno
import hmac
import mmap
import os
import secrets
import stat
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from gradserve.server.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnimplementedError,
)

__all__ = ["SharedMemoryRegistry", "RegionStatus", "Session", "Borrowed", "OutputArea", "SHM_DIR",
           "NATIVE_KEY_PREFIX", "CHALLENGE_BYTES", "ALIGN", "validate_key", "write_array"]

#: Where POSIX shared-memory objects live (Linux): ``shm_open("/name")`` is ``/dev/shm/name``.
SHM_DIR = "/dev/shm"
#: Keys of the segments the SDK creates (``/gradserve-...``): only its own sessions may map them.
NATIVE_KEY_PREFIX = "gradserve-"
#: Bytes of a session's challenge, written by the caller at offset 0 of each segment it registers.
CHALLENGE_BYTES = 16
#: Answer tensors placed in an ``OutputArea`` start at multiples of this offset in their region.
ALIGN = 64
#: Longest region name accepted (names appear in messages and metric-free logs).
MAX_NAME_LENGTH = 256
_NAME_MAX = 255   # a file name's limit (NAME_MAX), and so a POSIX shared-memory name's
_DISABLED = ("shared memory is off on this server; start it with 'gradserve serve --shared-memory on' "
             "(see docs/shared-memory.md)")


@dataclass(frozen=True)
class RegionStatus:
    """A registered region as the OIP status answers it."""

    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class Session:
    """A native session: its id and the challenge its segments must start with."""

    id: str
    challenge: bytes


def validate_key(key: str, field: str = "key") -> str:
    """The file name under ``SHM_DIR`` of a POSIX shared-memory name (``/name``); else InvalidArgumentError.

    Only names ``shm_open`` itself accepts portably: one leading ``/`` and no other, no ``.`` or
    ``..``, no NUL, at most 255 bytes. A path (``/dev/shm/x``, ``/../etc/x``) is refused, so a
    key can only ever name an object in ``SHM_DIR``.
    """
    if not isinstance(key, str) or not key.startswith("/"):
        raise InvalidArgumentError(f"{field}: {key!r:.80} is not a POSIX shared-memory name: it must start "
                                   "with '/' (e.g. '/input0')")
    name = key[1:]
    if not name or "/" in name or name in (".", "..") or "\0" in name or len(name.encode()) > _NAME_MAX:
        raise InvalidArgumentError(f"{field}: {key!r:.80} is not a POSIX shared-memory name: one leading '/', "
                                   "then 1 to 255 bytes without '/' or NUL, not '.' or '..'")
    return name


def _validate_name(name: str, field: str) -> None:
    if not name:
        raise InvalidArgumentError(f"{field}: a region name is required")
    if len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidArgumentError(f"{field}: {name!r:.80} is not a region name (printable, at most "
                                   f"{MAX_NAME_LENGTH} characters)")


def _size(value: int, field: str) -> int:
    if type(value) is not int or value < 0:
        raise InvalidArgumentError(f"{field}: {value!r:.32} is not a byte count")
    return value


class Region:
    """One mapped region: ``byte_size`` bytes at ``offset`` of the object ``key``.

    The mapping starts at the page boundary at or below ``offset`` (mmap needs one); ``_start``
    is the region's first byte within it. ``_users`` counts the calls holding it; a region that
    is no longer registered is unmapped when that count drops to zero.
    """

    __slots__ = ("name", "key", "offset", "byte_size", "session", "kind", "_fd", "_map", "_start", "_users",
                 "_registered", "_mapped_bytes", "__weakref__")

    def __init__(self, name: str, key: str, offset: int, byte_size: int, session: str | None, fd: int,
                 mapping: mmap.mmap, start: int) -> None:
        self.name, self.key, self.offset, self.byte_size, self.session = name, key, offset, byte_size, session
        #: "system" (POSIX, CPU memory). A CUDA region would be another kind with a device id.
        self.kind = "system"
        self._fd: int | None = fd
        self._map: mmap.mmap | None = mapping
        self._start = start
        self._users = 0
        self._registered = True
        self._mapped_bytes = len(mapping)

    def status(self) -> RegionStatus:
        return RegionStatus(self.name, self.key, self.offset, self.byte_size)

    def view(self, offset: int, byte_size: int, field: str) -> memoryview:
        """``byte_size`` bytes at ``offset`` of the region (the caller holds it: ``Borrowed``)."""
        _size(offset, f"{field}.offset")
        _size(byte_size, f"{field}.byte_size")
        if offset + byte_size > self.byte_size:
            raise InvalidArgumentError(f"{field}: offset {offset} + byte size {byte_size} is past the end of "
                                       f"region {self.name!r:.80} ({self.byte_size} bytes)")
        mapping, fd = self._map, self._fd
        assert mapping is not None and fd is not None, "a held region stays mapped"
        # An object shrunk under the mapping would fault (SIGBUS) on access: refuse it instead.
        # (A caller that shrinks it between this check and the copy is not stopped; see the module.)
        size = os.fstat(fd).st_size
        if size < self.offset + self.byte_size:
            raise FailedPreconditionError(f"{field}: the object {self.key!r:.80} behind region {self.name!r:.80} "
                                          f"was shrunk to {size} bytes, below the region's end at "
                                          f"{self.offset + self.byte_size}; unregister the region")
        start = self._start + offset
        return memoryview(mapping)[start:start + byte_size]


class Borrowed:
    """The regions one call uses, held from the first ``view`` until ``release`` (or the ``with`` exit).

    Views must not outlive the call: the region may be unmapped once it is released (the arrays
    over a view keep the memory mapped, but the server no longer counts it as used). A call that
    names no region costs nothing here but this object.
    """

    __slots__ = ("_registry", "_native", "_held")

    def __init__(self, registry: SharedMemoryRegistry, native: bool = False) -> None:
        self._registry = registry
        self._native = native
        self._held: dict[str, Region] | None = None

    def view(self, name: str, offset: int, byte_size: int, field: str) -> memoryview:
        """``byte_size`` bytes at ``offset`` of region ``name``: an OIP region's name, or (native) a
        region id that ``register_session_region`` returned."""
        if self._held is None:
            self._held = {}
        region = self._held.get(name)
        if region is None:
            region = self._registry._acquire(name, self._native, field)
            self._held[name] = region
        return region.view(offset, byte_size, field)

    def release(self) -> None:
        held, self._held = self._held, None
        if held:
            for region in held.values():
                self._registry._release(region)

    def __enter__(self) -> Borrowed:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held is not None:
            self.release()


def write_array(view: memoryview, arr: np.ndarray) -> None:
    """Write ``arr`` into ``view`` (exactly its size) as the wire has it: C order, little endian."""
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    np.copyto(np.ndarray(arr.shape, dtype, buffer=view), arr, casting="equiv")


class OutputArea:
    """A range of a region that a call writes its answer's tensors into, each at the next
    ``ALIGN`` boundary of the region (the native ``response_shared_memory``)."""

    def __init__(self, regions: Borrowed, region: str, offset: int, byte_size: int, field: str) -> None:
        self._view = regions.view(region, offset, byte_size, field)   # checks the range now
        self.region, self.offset, self.byte_size = region, offset, byte_size
        self._used = 0

    def place(self, arr: np.ndarray) -> int | None:
        """Write ``arr`` at the next boundary; its offset in the region, or None when it does not fit."""
        start = -(-(self.offset + self._used) // ALIGN) * ALIGN - self.offset
        if start + arr.nbytes > self.byte_size:
            return None
        write_array(self._view[start:start + arr.nbytes], arr)
        self._used = start + arr.nbytes
        return self.offset + start


class SharedMemoryRegistry:
    """Every region mapped by one server, with its limits.

    Parameters
    ----------
    enabled
        False: every registration is refused with UNIMPLEMENTED (``--shared-memory off``).
    max_regions
        Most regions mapped at once, OIP and native together (0: no limit).
    max_bytes
        Most bytes mapped at once (0: no limit).
    on_change
        Called with (regions, bytes mapped) after each change, e.g. to set gauges.
    shm_dir
        Where the objects are (tests may use another tmpfs folder).

    Thread-safe: registrations open and map objects outside the lock (a large region takes
    a while to map) after reserving their name and bytes under it.
    """

    def __init__(self, *, enabled: bool = True, max_regions: int = 0, max_bytes: int = 0,
                 on_change: Callable[[int, int], None] | None = None, shm_dir: str = SHM_DIR) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._on_change = on_change
        self._dir = shm_dir
        self._lock = threading.Lock()
        self._oip: dict[str, Region] = {}
        self._native: dict[str, Region] = {}          # region id -> region (ids are unguessable)
        self._sessions: dict[str, Session] = {}
        self._pending: set[str] = set()                 # OIP names being registered
        self._mapped = 0                                # regions still mapped (registered or in use)
        self._mapped_bytes = 0                          # their mapped bytes, reserved ones included

    # -- figures --------------------------------------------------------------------------------------
    @property
    def regions(self) -> int:
        """Regions mapped now (registered, or unregistered but still used by a call)."""
        return self._mapped

    @property
    def bytes_mapped(self) -> int:
        return self._mapped_bytes

    # -- the Open Inference Protocol ------------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> RegionStatus:
        """Map ``byte_size`` bytes at ``offset`` of POSIX object ``key`` as region ``name``."""
        self._check_enabled()
        _validate_name(name, "name")
        file = validate_key(key)
        if file.startswith(NATIVE_KEY_PREFIX):
            raise InvalidArgumentError(f"key: {key!r:.80} is a gradserve SDK segment; those are registered "
                                       "through their own session only")
        region = self._map(name, key, file, _size(offset, "offset"), _size(byte_size, "byte_size"), None, name)
        return region.status()

    def status(self, name: str = "") -> list[RegionStatus]:
        """The OIP regions (every one for ``name=""``); NotFoundError for an unknown name."""
        self._check_enabled()
        with self._lock:
            if not name:
                return [r.status() for r in sorted(self._oip.values(), key=lambda r: r.name)]
            region = self._oip.get(name)
        if region is None:
            raise NotFoundError(f"name: no system shared-memory region named {name!r:.80} is registered")
        return [region.status()]

    def unregister(self, name: str = "") -> None:
        """Unregister OIP region ``name`` (every OIP region for ``""``; an unknown name is no error,
        as in Triton). Calls using it finish first; new ones no longer find it."""
        self._check_enabled()
        with self._lock:
            if name:
                region = self._oip.pop(name, None)
                regions = [region] if region is not None else []
            else:
                regions, self._oip = list(self._oip.values()), {}
        for region in regions:
            self._unregistered(region)

    # -- native sessions -------------------------------------------------------------------------------
    def open_session(self) -> Session:
        """A new session (its regions are unregistered by ``close_session``)."""
        self._check_enabled()
        session = Session(secrets.token_hex(16), secrets.token_bytes(CHALLENGE_BYTES))
        with self._lock:
            self._sessions[session.id] = session
        return session

    def register_session_region(self, session_id: str, key: str, byte_size: int) -> str:
        """Map the first ``byte_size`` bytes of ``key`` for ``session_id``; returns the region's id.

        The object must start with the session's challenge (``CHALLENGE_BYTES``): FailedPreconditionError
        otherwise (the server does not see the caller's segment, or the caller did not write it).
        """
        self._check_enabled()
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFoundError("session_id: no such session (it ended); open a new one")
        file = validate_key(key)
        if _size(byte_size, "byte_size") < CHALLENGE_BYTES:
            raise InvalidArgumentError(f"byte_size: {byte_size} is less than the {CHALLENGE_BYTES} bytes of the "
                                       "challenge at the segment's start")
        region_id = secrets.token_hex(16)
        region = self._map(region_id, key, file, 0, byte_size, session_id, None)
        mapping = region._map
        assert mapping is not None
        if not hmac.compare_digest(bytes(mapping[:CHALLENGE_BYTES]), session.challenge):
            self._drop_native(region_id)
            raise FailedPreconditionError(f"key: {key!r:.80} does not start with the session's challenge: the "
                                          "server cannot see that segment (is it on another host?)")
        with self._lock:
            alive = session_id in self._sessions
        if not alive:  # the session ended while the object was being mapped
            self._drop_native(region_id)
            raise NotFoundError("session_id: the session ended during the registration")
        return region_id

    def unregister_session_region(self, session_id: str, region_id: str) -> None:
        """Unregister one of a session's regions (an unknown id is no error)."""
        with self._lock:
            region = self._native.get(region_id)
            if region is None or region.session != session_id:
                return
            del self._native[region_id]
        self._unregistered(region)

    def close_session(self, session_id: str) -> None:
        """End a session: its regions are unregistered (and unmapped once their calls finish)."""
        with self._lock:
            self._sessions.pop(session_id, None)
            regions = [r for r in self._native.values() if r.session == session_id]
            for r in regions:
                del self._native[r.name]
        for region in regions:
            self._unregistered(region)

    # -- use -------------------------------------------------------------------------------------------
    def borrow(self, native: bool = False) -> Borrowed:
        """The regions of one call: OIP regions by name, or (``native``) native regions by id.

        A native id is looked up whatever session registered it: it is an unguessable capability
        (128 random bits) that only that session's caller learnt, like a session id.
        """
        return Borrowed(self, native)

    def close(self) -> None:
        """Unregister everything (server shutdown): regions in use are unmapped as their calls finish."""
        with self._lock:
            regions = list(self._oip.values()) + list(self._native.values())
            self._oip, self._native, self._sessions = {}, {}, {}
        for region in regions:
            self._unregistered(region)

    # -- internals -------------------------------------------------------------------------------------
    def _check_enabled(self) -> None:
        if not self.enabled:
            raise UnimplementedError(_DISABLED)

    def _acquire(self, name: str, native: bool, field: str) -> Region:
        self._check_enabled()
        with self._lock:
            region = (self._native if native else self._oip).get(name)
            if region is None:
                what = "native shared-memory region" if native else "system shared-memory region"
                raise NotFoundError(f"{field}: no {what} named {name!r:.80} is registered")
            region._users += 1
            return region

    def _release(self, region: Region) -> None:
        with self._lock:
            region._users -= 1
            last = region._users == 0 and not region._registered
        if last:
            self._unmap(region)

    def _unregistered(self, region: Region) -> None:
        with self._lock:
            region._registered = False
            idle = region._users == 0
        if idle:
            self._unmap(region)

    def _drop_native(self, region_id: str) -> None:
        with self._lock:
            region = self._native.pop(region_id, None)
        if region is not None:
            self._unregistered(region)

    def _unmap(self, region: Region) -> None:
        mapping, fd = region._map, region._fd
        region._map = region._fd = None
        if fd is not None:
            os.close(fd)
        if mapping is None:
            return
        try:
            mapping.close()
        except BufferError:
            # Views of it are still alive (an array a call made over them): the mapping goes when the
            # last one is collected, and counts as mapped until then.
            weakref.finalize(mapping, self._forget, region._mapped_bytes)
            return
        self._forget(region._mapped_bytes)

    def _forget(self, nbytes: int) -> None:
        with self._lock:
            self._mapped -= 1
            self._mapped_bytes -= nbytes
            figures = (self._mapped, self._mapped_bytes)
        if self._on_change is not None:
            self._on_change(*figures)

    def _reserve(self, name: str | None, nbytes: int) -> None:
        """Take a slot and ``nbytes`` of the limits (and OIP ``name``) before mapping; or raise."""
        with self._lock:
            if name is not None and (name in self._oip or name in self._pending):
                raise AlreadyExistsError(f"name: a system shared-memory region named {name!r:.80} is already "
                                         "registered; unregister it first")
            if self.max_regions and self._mapped >= self.max_regions:
                raise ResourceExhaustedError(f"shared memory: {self._mapped} regions are mapped, the server's limit "
                                             f"(--max-shm-regions {self.max_regions}); unregister some first")
            if self.max_bytes and self._mapped_bytes + nbytes > self.max_bytes:
                raise ResourceExhaustedError(f"shared memory: mapping {nbytes} more bytes would exceed the server's "
                                             f"limit of {self.max_bytes} (--max-shm-bytes; {self._mapped_bytes} "
                                             "mapped); unregister some first")
            if name is not None:
                self._pending.add(name)
            self._mapped += 1
            self._mapped_bytes += nbytes

    def _map(self, name: str, key: str, file: str, offset: int, byte_size: int, session: str | None,
             oip_name: str | None) -> Region:
        """Open, check, allocate and map a region, then register it under its namespace."""
        if byte_size == 0:
            raise InvalidArgumentError("byte_size: must be at least 1")
        start = offset % mmap.ALLOCATIONGRANULARITY
        length = start + byte_size
        self._reserve(oip_name, length)
        fd = -1
        try:
            fd = _open(os.path.join(self._dir, file), key)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgumentError(f"key: {key!r:.80} is not a shared-memory object")
            if offset + byte_size > info.st_size:
                raise InvalidArgumentError(f"byte_size: offset {offset} + byte size {byte_size} is past the end of "
                                           f"the object {key!r:.80} ({info.st_size} bytes)")
            try:
                # Allocate its pages now: on a full /dev/shm the first write would fault (SIGBUS).
                # Existing data is kept; pages already there cost nothing.
                os.posix_fallocate(fd, offset, byte_size)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise ResourceExhaustedError(f"key: {SHM_DIR} has no room for the {byte_size} bytes of "
                                                 f"{key!r:.80}") from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate
                    raise
            mapping = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - start)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with self._lock:
                if oip_name is not None:
                    self._pending.discard(oip_name)
                self._mapped -= 1
                self._mapped_bytes -= length
            raise
        region = Region(name, key, offset, byte_size, session, fd, mapping, start)
        with self._lock:
            if oip_name is not None:
                self._pending.discard(oip_name)
                self._oip[oip_name] = region
            else:
                self._native[name] = region
            figures = (self._mapped, self._mapped_bytes)
        if self._on_change is not None:
            self._on_change(*figures)
        return region


def _open(path: str, key: str) -> int:
    """A read-write descriptor of the object at ``path``; domain errors for the usual failures."""
    try:
        # O_NOFOLLOW: a link planted in /dev/shm must not redirect the server to another file.
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(f"key: no shared-memory object {key!r:.80} on the server's host") from None
    except PermissionError:
        raise FailedPreconditionError(f"key: the server may not open {key!r:.80} for reading and writing "
                                      "(its owner or mode)") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR):
            raise InvalidArgumentError(f"key: {key!r:.80} is not a shared-memory object (a link or a "
                                       "folder)") from None
        raise FailedPreconditionError(f"key: cannot open {key!r:.80} ({exc.strerror})") from None
