"""The shared-memory registry on real POSIX objects in /dev/shm: what it maps and refuses, its limits
at their edges, unregistering a region a call still uses, native sessions and their challenge."""
from __future__ import annotations

import gc
import mmap
import os
import secrets
from typing import Callable, Iterator

import numpy as np
import pytest

from gradserve.server.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnimplementedError,
)
from gradserve.server.frontends.shared_memory import (
    CHALLENGE_BYTES,
    SHM_DIR,
    RegionStatus,
    SharedMemoryRegistry,
    validate_key,
)

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="POSIX shared memory lives in /dev/shm (Linux)")

PAGE = mmap.ALLOCATIONGRANULARITY


class Segment:
    """A caller's POSIX shared-memory object and its mapping (as tritonclient or the SDK makes one)."""

    def __init__(self, key: str, size: int) -> None:
        self.key, self.size = key, size
        self.path = os.path.join(SHM_DIR, key[1:])
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self.map, np.uint8)

    def unlink(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


@pytest.fixture()
def segment() -> Iterator[Callable[[int], Segment]]:
    made: list[Segment] = []

    def make(size: int, prefix: str = "gs-test-") -> Segment:
        seg = Segment(f"/{prefix}{secrets.token_hex(6)}", size)
        made.append(seg)
        return seg

    yield make
    for seg in made:
        seg.unlink()


def test_register_maps_the_callers_bytes_both_ways(segment: Callable[..., Segment]) -> None:
    seg = segment(3 * PAGE)
    seg.array[:] = np.arange(seg.size) % 251
    reg = SharedMemoryRegistry()
    # An offset that is not a page boundary: the region starts exactly there.
    assert reg.register("in", seg.key, 100, 2 * PAGE) == RegionStatus("in", seg.key, 100, 2 * PAGE)
    with reg.borrow() as use:
        view = use.view("in", 10, 20, "inputs[x]")
        assert bytes(view) == bytes(seg.array[110:130])
        np.frombuffer(view, np.uint8)[:] = 7   # the server writes: the caller sees it
        del view
    assert (seg.array[110:130] == 7).all() and seg.array[109] == 109 % 251
    assert reg.status() == [RegionStatus("in", seg.key, 100, 2 * PAGE)]
    assert reg.status("in") == reg.status()
    assert (reg.regions, reg.bytes_mapped) == (1, 100 + 2 * PAGE)
    reg.unregister("in")
    assert reg.status() == [] and (reg.regions, reg.bytes_mapped) == (0, 0)


@pytest.mark.parametrize("key", ["input0", "/", "/a/b", "/.", "/..", "/../etc/passwd", "/dev/shm/x", "/a\0b",
                                 "/" + "x" * 256, "", 7])
def test_keys_are_posix_shared_memory_names_only(key: object) -> None:
    with pytest.raises(InvalidArgumentError, match="key: .*POSIX shared-memory name"):
        SharedMemoryRegistry().register("r", key, 0, 8)  # type: ignore[arg-type]


def test_longest_key_accepted() -> None:
    assert validate_key("/" + "x" * 255) == "x" * 255


def test_refusals_name_the_field_and_leave_nothing_mapped(segment: Callable[..., Segment]) -> None:
    seg = segment(PAGE)
    reg = SharedMemoryRegistry()
    with pytest.raises(NotFoundError, match="key: no shared-memory object '/gs-test-missing'"):
        reg.register("r", "/gs-test-missing", 0, 8)
    with pytest.raises(InvalidArgumentError, match=r"byte_size: offset 0 \+ byte size 4097 is past the end of the "
                                                   r"object .* \(4096 bytes\)"):
        reg.register("r", seg.key, 0, PAGE + 1)   # mapping it would fault on the last page
    with pytest.raises(InvalidArgumentError, match=r"offset 4000 \+ byte size 97 is past the end"):
        reg.register("r", seg.key, 4000, 97)
    with pytest.raises(InvalidArgumentError, match="byte_size: must be at least 1"):
        reg.register("r", seg.key, 0, 0)
    with pytest.raises(InvalidArgumentError, match="offset: -1 is not a byte count"):
        reg.register("r", seg.key, -1, 8)
    with pytest.raises(InvalidArgumentError, match="name: a region name is required"):
        reg.register("", seg.key, 0, 8)
    with pytest.raises(InvalidArgumentError, match="gradserve SDK segment"):
        reg.register("r", "/gradserve-123-abc", 0, 8)
    reg.register("r", seg.key, 4000, 96)   # exactly to the end
    with pytest.raises(AlreadyExistsError, match="'r' is already registered"):
        reg.register("r", seg.key, 0, 8)
    assert (reg.regions, reg.bytes_mapped) == (1, 4096)
    with pytest.raises(NotFoundError, match="no system shared-memory region named 'nope'"):
        reg.status("nope")
    reg.unregister("nope")   # as in Triton: no error


def test_links_and_folders_are_not_objects(segment: Callable[..., Segment]) -> None:
    seg = segment(PAGE)
    link = os.path.join(SHM_DIR, f"gs-test-link-{secrets.token_hex(4)}")
    folder = os.path.join(SHM_DIR, f"gs-test-dir-{secrets.token_hex(4)}")
    os.symlink(seg.path, link)
    os.mkdir(folder)
    try:
        reg = SharedMemoryRegistry()
        for path in (link, folder):
            with pytest.raises(InvalidArgumentError, match="is not a shared-memory object"):
                reg.register("r", "/" + os.path.basename(path), 0, 8)
        assert reg.regions == 0
    finally:
        os.unlink(link)
        os.rmdir(folder)


def test_region_limit_at_its_edge(segment: Callable[..., Segment]) -> None:
    seg = segment(PAGE)
    reg = SharedMemoryRegistry(max_regions=2)
    reg.register("a", seg.key, 0, 8)
    reg.register("b", seg.key, 8, 8)
    with pytest.raises(ResourceExhaustedError, match=r"2 regions are mapped.*--max-shm-regions 2"):
        reg.register("c", seg.key, 16, 8)
    reg.unregister("a")
    reg.register("c", seg.key, 16, 8)


def test_byte_limit_at_its_edge(segment: Callable[..., Segment]) -> None:
    seg = segment(4 * PAGE)
    reg = SharedMemoryRegistry(max_bytes=3 * PAGE)
    reg.register("a", seg.key, 0, 2 * PAGE)
    with pytest.raises(ResourceExhaustedError, match=f"mapping {PAGE + 1} more bytes would exceed.*{3 * PAGE}"):
        reg.register("b", seg.key, 0, PAGE + 1)
    reg.register("b", seg.key, 0, PAGE)   # exactly the limit
    assert reg.bytes_mapped == 3 * PAGE


def test_unregister_while_a_call_uses_it(segment: Callable[..., Segment]) -> None:
    seg = segment(PAGE)
    seg.array[:16] = 42
    changes: list[tuple[int, int]] = []
    reg = SharedMemoryRegistry(on_change=lambda *figures: changes.append(figures))
    reg.register("r", seg.key, 0, PAGE)
    call = reg.borrow()
    x = np.frombuffer(call.view("r", 0, 16, "inputs[x]"), np.uint8)
    reg.unregister("r")
    # The name is gone at once: new calls do not find it, and it may be registered again.
    with pytest.raises(NotFoundError, match="inputs\\[y\\]: no system shared-memory region named 'r'"):
        reg.borrow().view("r", 0, 16, "inputs[y]")
    assert reg.status() == []
    # The call goes on reading mapped memory, which still counts as mapped.
    assert (x == 42).all()
    assert (reg.regions, reg.bytes_mapped) == (1, PAGE)
    call.view("r", 16, 16, "outputs[y]")   # the same call may still use it
    call.release()
    # Released, but an array over its memory is alive: it is unmapped once that array goes.
    assert reg.regions == 1
    del x
    gc.collect()
    assert (reg.regions, reg.bytes_mapped) == (0, 0)
    assert changes[-1] == (0, 0)


def test_released_without_views_is_unmapped_at_once(segment: Callable[..., Segment]) -> None:
    seg = segment(PAGE)
    reg = SharedMemoryRegistry()
    reg.register("r", seg.key, 0, PAGE)
    with reg.borrow() as call:
        bytes(call.view("r", 0, 8, "x"))
        reg.unregister("r")
        reg.register("r", seg.key, 0, 8)   # the name is free again while the old region is in use
        assert reg.regions == 2
    assert (reg.regions, reg.bytes_mapped) == (1, 8)


def test_views_are_bounded_by_the_region(segment: Callable[..., Segment]) -> None:
    seg = segment(PAGE)
    reg = SharedMemoryRegistry()
    reg.register("r", seg.key, 64, 128)
    with reg.borrow() as call:
        assert len(call.view("r", 0, 128, "x")) == 128
        with pytest.raises(InvalidArgumentError, match=r"outputs\['y'\]: offset 100 \+ byte size 29 is past the "
                                                       r"end of region 'r' \(128 bytes\)"):
            call.view("r", 100, 29, "outputs['y']")
        with pytest.raises(NotFoundError, match="no system shared-memory region named 'q'"):
            call.view("q", 0, 1, "x")


def test_a_shrunk_object_is_refused_not_faulted(segment: Callable[..., Segment]) -> None:
    seg = segment(2 * PAGE)
    reg = SharedMemoryRegistry()
    reg.register("r", seg.key, 0, 2 * PAGE)
    os.truncate(seg.path, PAGE)   # touching the second page now would be SIGBUS
    with reg.borrow() as call:
        with pytest.raises(FailedPreconditionError, match="was shrunk to 4096 bytes"):
            call.view("r", PAGE, 8, "x")


def test_unregister_all_leaves_native_regions(segment: Callable[..., Segment]) -> None:
    seg = segment(PAGE)
    reg = SharedMemoryRegistry()
    session = reg.open_session()
    native = segment(PAGE, prefix="gradserve-test-")
    native.map[:CHALLENGE_BYTES] = session.challenge
    region = reg.register_session_region(session.id, native.key, PAGE)
    reg.register("a", seg.key, 0, 8)
    reg.register("b", seg.key, 8, 8)
    reg.unregister()
    assert reg.status() == [] and reg.regions == 1
    with reg.borrow(native=True) as call:
        call.view(region, 0, 8, "x")


def test_off_refuses_every_request() -> None:
    reg = SharedMemoryRegistry(enabled=False)
    for attempt in (lambda: reg.register("r", "/x", 0, 8), reg.status, reg.unregister, reg.open_session):
        with pytest.raises(UnimplementedError, match="shared memory is off on this server.*--shared-memory on"):
            attempt()


def test_a_session_region_needs_the_challenge(segment: Callable[..., Segment]) -> None:
    reg = SharedMemoryRegistry()
    session = reg.open_session()
    seg = segment(2 * PAGE, prefix="gradserve-test-")
    seg.map[:CHALLENGE_BYTES] = bytes(CHALLENGE_BYTES)
    with pytest.raises(FailedPreconditionError, match="does not start with the session's challenge"):
        reg.register_session_region(session.id, seg.key, 2 * PAGE)
    assert reg.regions == 0
    other = reg.open_session()
    seg.map[:CHALLENGE_BYTES] = other.challenge   # another session's challenge is no proof
    with pytest.raises(FailedPreconditionError):
        reg.register_session_region(session.id, seg.key, 2 * PAGE)
    seg.map[:CHALLENGE_BYTES] = session.challenge
    region = reg.register_session_region(session.id, seg.key, 2 * PAGE)
    assert len(region) == 32 and reg.regions == 1
    assert reg.status() == []   # native regions are not the OIP's to list
    with pytest.raises(NotFoundError):
        reg.borrow().view(region, 0, 1, "x")   # nor to use
    with pytest.raises(NotFoundError, match="session_id: no such session"):
        reg.register_session_region("0" * 32, seg.key, PAGE)
    with pytest.raises(InvalidArgumentError, match="less than the 16 bytes of the challenge"):
        reg.register_session_region(session.id, seg.key, 8)


def test_closing_a_session_unregisters_its_regions(segment: Callable[..., Segment]) -> None:
    reg = SharedMemoryRegistry()
    session, other = reg.open_session(), reg.open_session()
    regions = []
    for s in (session, session, other):
        seg = segment(PAGE, prefix="gradserve-test-")
        seg.map[:CHALLENGE_BYTES] = s.challenge
        regions.append(reg.register_session_region(s.id, seg.key, PAGE))
        seg.unlink()   # the SDK unlinks its segment once the server mapped it: the mapping stays
    call = reg.borrow(native=True)
    call.view(regions[0], 64, 8, "inputs[x]")
    reg.close_session(session.id)
    assert reg.regions == 2   # the one in use stays mapped until its call ends
    with pytest.raises(NotFoundError, match="no native shared-memory region named"):
        reg.borrow(native=True).view(regions[1], 0, 1, "x")
    call.release()
    assert reg.regions == 1
    reg.unregister_session_region(session.id, regions[2])   # not that session's: ignored
    assert reg.regions == 1
    reg.unregister_session_region(other.id, regions[2])
    assert reg.regions == 0
    with pytest.raises(NotFoundError, match="no such session"):
        reg.register_session_region(session.id, "/gradserve-x", PAGE)


def test_close_unregisters_everything(segment: Callable[..., Segment]) -> None:
    seg = segment(PAGE)
    reg = SharedMemoryRegistry()
    reg.register("a", seg.key, 0, 8)
    session = reg.open_session()
    native = segment(PAGE, prefix="gradserve-test-")
    native.map[:CHALLENGE_BYTES] = session.challenge
    reg.register_session_region(session.id, native.key, PAGE)
    reg.close()
    assert (reg.regions, reg.bytes_mapped) == (0, 0) and reg.status() == []
