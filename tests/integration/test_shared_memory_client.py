"""The SDK's ``shared_memory=True`` and the native SharedMemoryService it drives, on a real server.

Answers through shared memory must equal the socket's (dense2 also against its closed form);
the client falls back to the socket, silently and with the same answers, when the server has
shared memory off or cannot see the client's segments; nothing of the client's is left in
/dev/shm or mapped in the server once it closes; a session ended under a call in flight does
not break it. The protocol's refusals are checked with raw gRPC, as another language sees them.
"""
from __future__ import annotations

import asyncio
import mmap
import os
import secrets
import threading
import time
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import pytest

import gradserve
from gated_model import MARK, Gate
from gradserve import _codec
from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc
from gradserve.v1 import shared_memory_service_pb2 as shm_pb
from gradserve.v1 import shared_memory_service_pb2_grpc as shm_grpc

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory lives in /dev/shm (Linux)")

TOKEN = "sdk-shm-token"
REGIONS = 3


def _own_segments() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"gradserve-{os.getpid()}-")]


def _wait_for(what: Callable[[], bool], message: Callable[[], str]) -> None:
    """Wait for a state of the server (polled; not a timing check)."""
    end = time.monotonic() + 120
    while not what():
        assert time.monotonic() < end, message()
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from gradserve.server.config import BatchingConfig, EngineConfig, Limits, ServerConfig
    from gradserve.server.models import demo

    tokens = tmp_path_factory.mktemp("sdk-shm") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    gate = Gate()
    srv = start_server(ServerConfig(auth_token_file=str(tokens), compute_threads=3, engine=EngineConfig(xla="off"),
                                    limits=Limits(max_shm_regions=REGIONS),
                                    model_batching={"gate": BatchingConfig(enabled=False)}),
                       models={"dense2": demo.build_dense2, "cnn": demo.build_cnn, "multi": demo.build_multi,
                               "gate": gate.model})
    srv.gate = gate
    yield srv
    gate.release.set()


@pytest.fixture()
def regions(server: Any) -> Iterator[Any]:
    """The server's registry; every test leaves it empty, and /dev/shm without our segments."""
    registry = server.server.shared_memory
    yield registry
    _wait_for(lambda: registry.regions == 0, lambda: f"{registry.regions} regions still mapped")
    assert _own_segments() == []


def _pair(address: str, **kwargs: Any) -> tuple[gradserve.Client, gradserve.Client]:
    return (gradserve.Client(address, token=TOKEN, **kwargs),
            gradserve.Client(address, token=TOKEN, shared_memory=True, shared_memory_threshold=0, **kwargs))


def test_answers_equal_the_sockets(server: Any, regions: Any) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((6, 4), dtype=np.float32)
    images = rng.random((3, 16, 16, 1), dtype=np.float32)
    multi = {"a": rng.random((5, 3), dtype=np.float32), "b": rng.random((5, 2), dtype=np.float32)}
    plain, shared = _pair(server.address)
    with plain, shared:
        np.testing.assert_allclose(shared.predict("dense2", x)[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5)
        np.testing.assert_allclose(shared.gradient("dense2", x), 0.5, rtol=1e-5)
        calls: list[tuple[str, Any, dict[str, Any]]] = [
            ("predict", images, {}), ("gradient", images, {"target": "argmax"}),
            ("integrated_gradients", images, {"baseline": images * 0.5, "steps": 8, "return_delta": True}),
            ("jacobian", x, {}), ("vjp", x, {"cotangents": rng.random((6, 1), dtype=np.float32)}),
            ("gradient", multi, {"output": "y2", "return_outputs": True}),
        ]
        for method, inputs, options in calls:
            model = {id(x): "dense2", id(images): "cnn", id(multi): "multi"}[id(inputs)]
            expected = getattr(plain, method)(model, inputs, **options)
            got = getattr(shared, method)(model, inputs, **options)
            for e, g in zip(_flat(expected), _flat(got)):
                np.testing.assert_array_equal(g, e, err_msg=f"{method} on {model}")
        core = shared._shm.core  # type: ignore[union-attr]
        assert core.sent == 2 + len(calls) and core.fell_back == 0
        assert regions.regions >= 1 and _own_segments() == []   # mapped by both, named nowhere
    # closed: the session ended, the regions are unmapped, nothing is left (the fixture checks)


def _flat(value: Any) -> list[np.ndarray]:
    if isinstance(value, dict):
        return [np.asarray(value[k]) for k in sorted(value)]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _flat(v)]
    return [np.asarray(value)]


def test_below_the_threshold_nothing_changes(server: Any, regions: Any) -> None:
    with gradserve.Client(server.address, token=TOKEN, shared_memory=True) as c:   # threshold 1 MiB
        c.gradient("dense2", np.ones((2, 4), np.float32))
        assert c._shm.core.sent == 0 and regions.regions == 0   # type: ignore[union-attr]
        big = np.ones((1 << 16, 4), np.float32)   # exactly 1 MiB: through shared memory
        np.testing.assert_allclose(c.gradient("dense2", big), 0.5, rtol=1e-5)
        assert c._shm.core.sent == 1   # type: ignore[union-attr]


def test_segments_are_reused(server: Any, regions: Any) -> None:
    x = np.ones((64, 4), np.float32)
    with gradserve.Client(server.address, token=TOKEN, shared_memory=True, shared_memory_threshold=0) as c:
        for _ in range(5):
            c.gradient("dense2", x)
        assert c._shm.core.sent == 5 and len(c._shm.core.pool.segments()) == 1   # type: ignore[union-attr]
        assert regions.regions == 1


def test_off_falls_back_silently(start_server: Callable[..., Any]) -> None:
    from gradserve.server.config import ServerConfig

    srv = start_server(ServerConfig(demo_models=True, shared_memory=False))
    x = np.random.default_rng(1).random((8, 4), dtype=np.float32)
    with gradserve.Client(srv.address, shared_memory=True, shared_memory_threshold=0) as c:
        np.testing.assert_allclose(c.gradient("dense2", x), 0.5, rtol=1e-5)
        np.testing.assert_allclose(c.predict("dense2", x)[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5)
        assert c._shm.core.sent == 0 and c._shm.core.fell_back == 1   # type: ignore[union-attr]
    assert _own_segments() == []


def test_a_server_that_cannot_see_the_segment(start_server: Callable[..., Any], tmp_path: Any) -> None:
    """As on another host: the server looks for the segment in its own /dev/shm (here another
    folder) and does not find it; the client answers through the socket."""
    from gradserve.server.config import ServerConfig

    srv = start_server(ServerConfig(demo_models=True))
    srv.server.shared_memory._dir = str(tmp_path)   # the other host's /dev/shm
    x = np.ones((8, 4), np.float32)
    with gradserve.Client(srv.address, shared_memory=True, shared_memory_threshold=0) as c:
        np.testing.assert_allclose(c.gradient("dense2", x), 0.5, rtol=1e-5)
        assert c._shm.core.sent == 0 and c._shm.core.fell_back == 1   # type: ignore[union-attr]
    assert _own_segments() == [] and srv.server.shared_memory.regions == 0


def test_a_session_ended_under_a_call(server: Any, regions: Any) -> None:
    """The server ends the session (e.g. it restarts) while a call uses its region: the call
    finishes; the next call, whose region is gone, is answered through the socket, and the one
    after opens a new session."""
    gate = server.gate
    x = np.ones((1, 4), np.float32)
    x[0, 0] = MARK
    with gradserve.Client(server.address, token=TOKEN, shared_memory=True, shared_memory_threshold=0,
                          timeout=300) as c:
        core = c._shm.core  # type: ignore[union-attr]
        gate.release.clear()
        answers: list[Any] = []
        worker = threading.Thread(target=lambda: answers.append(c.predict("gate", x)))
        worker.start()
        try:
            _wait_for(lambda: server.server.admission.calls == 1, lambda: "the call did not reach the model")
            session = c._shm._session.id  # type: ignore[union-attr]
            regions.close_session(session)
            assert regions.regions == 1   # still mapped for the call in flight
        finally:
            gate.release.set()
            worker.join(120)
        np.testing.assert_array_equal(answers[0], x)
        assert core.sent == 1
        y = np.full((1, 4), 2.0, np.float32)
        np.testing.assert_array_equal(c.predict("gate", y), y)   # region gone: through the socket
        assert core.sent == 1 and core.fell_back == 1
        core._retry_at = 0.0   # (the fallback only happened because the session went away)
        np.testing.assert_array_equal(c.predict("gate", y), y)
        assert core.sent == 2 and c._shm._session.id != session  # type: ignore[union-attr]


def test_async_client(server: Any, regions: Any) -> None:
    images = np.random.default_rng(2).random((4, 16, 16, 1), dtype=np.float32)

    async def main() -> tuple[Any, Any, int]:
        async with gradserve.AsyncClient(server.address, token=TOKEN) as plain, \
                gradserve.AsyncClient(server.address, token=TOKEN, shared_memory=True,
                                      shared_memory_threshold=0) as shared:
            expected = await plain.gradient("cnn", images, target=3)
            got = await asyncio.gather(*(shared.gradient("cnn", images, target=3) for _ in range(3)))
            return expected, got, shared._shm.core.sent  # type: ignore[union-attr]

    expected, got, sent = asyncio.run(main())
    for g in got:
        np.testing.assert_array_equal(g, expected)
    assert sent == 3


def test_streams_and_chunked_calls_use_the_socket(server: Any, regions: Any) -> None:
    x = np.ones((8, 4), np.float32)
    with gradserve.Client(server.address, token=TOKEN, shared_memory=True, shared_memory_threshold=0) as c:
        results = list(c.stream("dense2", [x, x], method="gradient"))
        np.testing.assert_allclose(results[1], 0.5, rtol=1e-5)
        assert c._shm.core.sent == 0   # type: ignore[union-attr]


# -- the protocol, as another language sees it --------------------------------------------------------
class Segment:
    """A caller's segment made with the system calls any language has."""

    def __init__(self, size: int) -> None:
        self.key = f"/gs-test-native-{secrets.token_hex(6)}"
        self.path = "/dev/shm/" + self.key[1:]
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        self.map = mmap.mmap(fd, size)
        os.close(fd)

    def unlink(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


@pytest.fixture()
def stubs(server: Any) -> Iterator[tuple[Any, Any, Any]]:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(server.address) as channel:
        yield shm_grpc.SharedMemoryServiceStub(channel), pb_grpc.SensitivityServiceStub(channel), metadata


def _session(stub: Any, metadata: Any) -> tuple[Any, shm_pb.OpenSessionResponse]:
    call = stub.OpenSession(shm_pb.OpenSessionRequest(), metadata=metadata)
    return call, next(call)


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_native_protocol_step_by_step(stubs: tuple[Any, Any, Any], regions: Any) -> None:
    stub, compute, metadata = stubs
    held, opened = _session(stub, metadata)
    seg = Segment(4096)
    try:
        register = shm_pb.RegisterRegionRequest(session_id=opened.session_id, key=seg.key, byte_size=4096)
        # Without the challenge at its start the segment is no proof.
        code, message = _code(lambda: stub.RegisterRegion(register, metadata=metadata))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not start with the session's challenge" in message
        seg.map[:16] = opened.challenge
        region = stub.RegisterRegion(register, metadata=metadata).region
        seg.unlink()   # the mapping outlives the name
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        seg.map[64:64 + x.nbytes] = x.tobytes()
        request = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT, include_outputs=True)
        tensor = request.inputs["input"]
        tensor.dtype, tensor.shape[:] = 1, [2, 4]
        tensor.shared_memory.region, tensor.shared_memory.offset, tensor.shared_memory.byte_size = region, 64, 32
        area = request.response_shared_memory
        area.region, area.offset, area.byte_size = region, 100, 60   # room for the outputs only
        response = compute.Compute(request, metadata=metadata, timeout=60)
        where = response.outputs["alpha"].shared_memory   # outputs first, at the next 64-byte boundary
        assert (where.region, where.offset, where.byte_size) == (region, 128, 8)
        assert response.outputs["alpha"].data == b""
        np.testing.assert_allclose(np.frombuffer(seg.map[128:136], np.float32), 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5)
        # What did not fit what was left came back in the message.
        assert not response.attributions["input"].HasField("shared_memory")
        np.testing.assert_allclose(_codec.decode(response.attributions["input"]), 0.5, rtol=1e-5)
        area.byte_size = 160   # now both fit: the gradient goes to the boundary after the outputs
        response = compute.Compute(request, metadata=metadata, timeout=60)
        assert response.attributions["input"].shared_memory.offset == 192
        np.testing.assert_allclose(np.frombuffer(seg.map[192:224], np.float32), 0.5, rtol=1e-5)
        # Refusals, as the status of the Compute call.
        tensor.shared_memory.byte_size = 28
        code, message = _code(lambda: compute.Compute(request, metadata=metadata, timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "byte_size: 28 bytes, but shape [2, 4]" in message
        tensor.shared_memory.byte_size, area.byte_size = 32, 4000
        code, message = _code(lambda: compute.Compute(request, metadata=metadata, timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "past the end of region" in message
        area.byte_size, tensor.shared_memory.region = 160, "0" * 32
        code, message = _code(lambda: compute.Compute(request, metadata=metadata, timeout=60))
        assert code == grpc.StatusCode.NOT_FOUND and "no native shared-memory region named" in message
        unknown = shm_pb.RegisterRegionRequest(session_id="nope", key=seg.key, byte_size=16)
        assert _code(lambda: stub.RegisterRegion(unknown, metadata=metadata))[0] == grpc.StatusCode.NOT_FOUND
        missing = shm_pb.RegisterRegionRequest(session_id=opened.session_id, key="/gs-test-missing", byte_size=16)
        assert _code(lambda: stub.RegisterRegion(missing, metadata=metadata))[0] == grpc.StatusCode.NOT_FOUND
        stub.UnregisterRegion(shm_pb.UnregisterRegionRequest(session_id=opened.session_id, region=region),
                              metadata=metadata)
        _wait_for(lambda: regions.regions == 0, lambda: "the region stayed mapped")
    finally:
        held.cancel()
        seg.unlink()


def test_native_limits_and_token(stubs: tuple[Any, Any, Any], regions: Any) -> None:
    stub, _, metadata = stubs
    code, _ = _code(lambda: next(stub.OpenSession(shm_pb.OpenSessionRequest())))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    held, opened = _session(stub, metadata)
    segments = [Segment(4096) for _ in range(REGIONS + 1)]
    try:
        code, _ = _code(lambda: stub.RegisterRegion(shm_pb.RegisterRegionRequest(
            session_id=opened.session_id, key=segments[0].key, byte_size=4096)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        for seg in segments:
            seg.map[:16] = opened.challenge
        for seg in segments[:REGIONS]:   # exactly the limit
            stub.RegisterRegion(shm_pb.RegisterRegionRequest(session_id=opened.session_id, key=seg.key,
                                                             byte_size=4096), metadata=metadata)
        code, message = _code(lambda: stub.RegisterRegion(shm_pb.RegisterRegionRequest(
            session_id=opened.session_id, key=segments[-1].key, byte_size=4096), metadata=metadata))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"--max-shm-regions {REGIONS}" in message
        assert regions.regions == REGIONS
    finally:
        held.cancel()   # the session's end unregisters all three
        for seg in segments:
            seg.unlink()
