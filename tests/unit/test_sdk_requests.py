"""SDK without sockets: the public surface, input preparation, target building, row chunking of
large calls, stream bookkeeping and the errors table."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

import gradserve
from gradserve import _codec
from gradserve._core import StreamBook
from gradserve._exceptions import from_status
from gradserve._models import ModelInfo, TensorInfo, VersionInfo, prepare_inputs
from gradserve._requests import MESSAGE_OVERHEAD_BYTES, ComputeResult, build_call, merge_results, plan_rows
from gradserve.v1 import sensitivity_service_pb2 as pb2

F32 = np.dtype("float32")


def info(inputs: dict[str, tuple[int, ...]], outputs: dict[str, tuple[int, ...]]) -> ModelInfo:
    version = VersionInfo(1, "READY", "", tuple(TensorInfo(n, F32, s, True) for n, s in inputs.items()),
                          tuple(TensorInfo(n, F32, s) for n, s in outputs.items()))
    return ModelInfo("m", (version,))


DENSE2 = info({"input": (-1, 4)}, {"alpha": (-1, 1)})
MULTI = info({"a": (-1, 3), "b": (-1, 2)}, {"y1": (-1, 2), "y2": (-1, 3)})


def test_public_surface_is_exactly_all():
    assert gradserve.__all__ == [
        "AsyncClient", "Client", "ComputeResult", "SensitivityResult", "PartialDependenceResult", "ModelInfo",
        "TensorInfo", "VersionInfo",
        "GradserveError", "InvalidArgument", "NotFound", "FailedPrecondition", "Unavailable",
        "ResourceExhausted", "DeadlineExceeded", "Cancelled", "Unauthenticated", "PermissionDenied",
        "Unimplemented", "Internal", "__version__",
    ]
    public = {n for n in dir(gradserve) if not n.startswith("_")} - {"v1", "server"}  # subpackages
    assert public <= set(gradserve.__all__)


# -- inputs ------------------------------------------------------------------------------------
def test_array_likes_are_converted_to_the_model_dtype_and_checked():
    p = prepare_inputs([[1, 2, 3, 4]], DENSE2.inputs)
    assert p.arrays["input"].dtype == F32 and p.structure == "single"
    with pytest.raises(gradserve.InvalidArgument, match="rank 1"):
        prepare_inputs([1, 2, 3, 4], DENSE2.inputs)
    with pytest.raises(gradserve.InvalidArgument, match="dimension 1 is 5 but the model expects 4"):
        prepare_inputs(np.ones((2, 5)), DENSE2.inputs)
    with pytest.raises(gradserve.InvalidArgument, match="cannot be converted"):
        prepare_inputs(np.ones((2, 4), np.complex64), DENSE2.inputs)


def test_several_inputs_by_name_or_in_order_and_wrong_names_raise_before_a_call():
    a, b = np.ones((2, 3)), np.ones((2, 2))
    assert prepare_inputs([a, b], MULTI.inputs).structure == "list"
    with pytest.raises(gradserve.NotFound, match="unknown input name 'c'"):
        build_call(MULTI, "multi", "gradient", {"a": a, "c": b})
    with pytest.raises(gradserve.InvalidArgument, match="missing input 'b'"):
        build_call(MULTI, "multi", "gradient", {"a": a})
    with pytest.raises(gradserve.InvalidArgument, match="2 inputs"):
        build_call(MULTI, "multi", "gradient", [a])


def test_results_mirror_the_callers_structure_in_its_order():
    a, b = np.ones((2, 3)), np.ones((2, 2))
    attributions = {"a": np.full((2, 3), 1.0), "b": np.full((2, 2), 2.0)}
    result = ComputeResult("multi", 1, "", attributions=attributions)
    as_dict = build_call(MULTI, "multi", "gradient", {"b": b, "a": a}).finish(result)
    assert list(as_dict) == ["b", "a"]
    as_list = build_call(MULTI, "multi", "gradient", [a, b]).finish(result)
    assert [x[0, 0] for x in as_list] == [1.0, 2.0]


# -- targets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("target, kind, indices", [
    (None, pb2.TARGET_KIND_SUM, []),
    (3, pb2.TARGET_KIND_INDEX, [3]),
    ([0, 2], pb2.TARGET_KIND_INDEX, [0, 2]),
    (np.array([1, 1]), pb2.TARGET_KIND_INDEX, [1, 1]),
    ("argmax", pb2.TARGET_KIND_ARGMAX, []),
])
def test_targets_become_output_selectors(target, kind, indices):
    req = build_call(DENSE2, "dense2", "gradient", np.ones((2, 4)), target=target, output="alpha").request
    assert req.target.kind == kind and list(req.target.indices) == indices
    assert req.target.output_name == "alpha"


@pytest.mark.parametrize("target", ["max", [0.5, 1.5], [[0], [1]]])
def test_bad_targets_raise_invalid_argument(target):
    with pytest.raises(gradserve.InvalidArgument, match="target"):
        build_call(DENSE2, "dense2", "gradient", np.ones((2, 4)), target=target)


def test_bad_method_options_raise_before_a_call():
    with pytest.raises(gradserve.InvalidArgument, match="unknown method"):
        build_call(DENSE2, "dense2", "curl", np.ones((1, 4)))
    with pytest.raises(gradserve.InvalidArgument, match="quadrature"):
        build_call(DENSE2, "dense2", "integrated_gradients", np.ones((1, 4)), quadrature="simpson")
    with pytest.raises(gradserve.InvalidArgument, match="tangents"):
        build_call(DENSE2, "dense2", "jvp", np.ones((1, 4)))


# -- chunking ----------------------------------------------------------------------------------
def test_plan_rows_splits_by_the_larger_of_request_and_response():
    limit = MESSAGE_OVERHEAD_BYTES + 1000
    assert plan_rows(10, 100, 10, 0, limit, 65536) == [(0, 10)]
    assert plan_rows(25, 100, 250, 0, limit, 65536) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24), (24, 25)]
    assert plan_rows(10, 1, 1, 0, limit, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]   # the row cap
    with pytest.raises(gradserve.ResourceExhausted, match="one example needs about 1001 bytes"):
        plan_rows(2, 1001, 1, 0, limit, 65536)


def test_a_large_call_is_split_into_requests_that_each_fit():
    limit = MESSAGE_OVERHEAD_BYTES + 4096
    x = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)   # 16 KB
    target = np.arange(1000) % 1
    call = build_call(DENSE2, "dense2", "integrated_gradients", x, target=target, baseline=np.zeros(4),
                      max_message_bytes=limit, return_outputs=True)
    requests = list(call.requests())
    assert len(requests) > 4 and all(r.ByteSize() <= limit for r in requests)
    rows = np.concatenate([_codec.decode(r.inputs["input"]) for r in requests])
    np.testing.assert_array_equal(rows, x)
    assert sum(len(r.target.indices) for r in requests) == 1000
    # The baseline is one example shared by every chunk, not sliced.
    assert all(_codec.decode(r.integrated_gradients.baselines["input"]).shape == (4,) for r in requests)
    results = [ComputeResult("dense2", 1, "", outputs={"alpha": _codec.decode(r.inputs["input"])[:, :1]},
                             attributions={"input": _codec.decode(r.inputs["input"])}) for r in requests]
    outputs, attributions = call.finish(results)
    np.testing.assert_array_equal(attributions, x)
    np.testing.assert_array_equal(outputs, x[:, :1])


def test_merge_results_concatenates_along_the_batch():
    parts = [ComputeResult("m", 1, "", attributions={"x": np.full((2, 3), i)}, extras={"delta": np.full(2, i)},
                           target_indices=np.array([i, i])) for i in range(3)]
    merged = merge_results(parts)
    assert merged.attributions["x"].shape == (6, 3) and list(merged.extras["delta"]) == [0, 0, 1, 1, 2, 2]
    assert list(merged.target_indices) == [0, 0, 1, 1, 2, 2]


# -- streams -----------------------------------------------------------------------------------
def _book(window: int = 3) -> StreamBook:
    return StreamBook(lambda batch, i: build_call(DENSE2, "dense2", "predict", batch, request_id=str(i)), window, 4)


def _answer(index: int, value: float) -> pb2.ComputeStreamResponse:
    resp = pb2.ComputeResponse(request_id=str(index), model="dense2", version=1)
    _codec.encode(np.full((1, 1), value, np.float32), out=resp.outputs["alpha"])
    return pb2.ComputeStreamResponse(request_id=str(index), response=resp)


def test_stream_book_orders_results_and_replays_the_unanswered():
    book = _book()
    for i in range(3):
        assert book.pull(np.full((1, 4), i)) is not None
    assert book.full
    book.answer(_answer(1, 1.0))                      # out of order: held back
    assert list(book.results()) == []
    book.answer(_answer(0, 0.0))
    assert [r[0, 0] for r in book.results()] == [0.0, 1.0]
    assert [r.request.request_id for r in book.replay()] == ["2"]   # what a restarted stream resends
    book.answer(_answer(1, 9.0))                      # a duplicate after a restart is ignored
    book.end()
    book.answer(_answer(2, 2.0))
    assert [r[0, 0] for r in book.results()] == [2.0] and book.complete


def test_stream_book_raises_errors_at_their_position():
    book = _book(window=8)
    book.pull(np.ones((1, 4)))
    book.pull(np.ones((1, 4)))
    assert book.pull(np.ones((1, 5))) is None and book.finished_sending   # a bad batch stops sending
    failed = pb2.ComputeStreamResponse(request_id="1")
    failed.error.code = grpc.StatusCode.NOT_FOUND.value[0]
    failed.error.message = "model: unknown"
    book.answer(_answer(0, 0.0))
    book.answer(failed)
    results = book.results()
    assert next(results)[0, 0] == 0.0
    with pytest.raises(gradserve.NotFound, match="model: unknown"):
        next(results)
    with pytest.raises(gradserve.InvalidArgument, match="dimension 1 is 5"):
        list(book.results())


# -- errors ------------------------------------------------------------------------------------
def test_every_status_code_has_its_exception_under_gradserve_error():
    for code in grpc.StatusCode:
        exc = from_status(code, "field: why")
        assert isinstance(exc, gradserve.GradserveError) and exc.details == "field: why"
        assert type(exc).__name__ in gradserve.__all__
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
                        grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS):
            assert exc.code == code and type(exc).code == code
        else:
            assert isinstance(exc, gradserve.Internal)


# -- targets of the channel ----------------------------------------------------------------------
def test_several_addresses_become_one_round_robin_target():
    from gradserve._channel import channel_target

    assert channel_target("127.0.0.1:50051") == ("127.0.0.1:50051", False)
    assert channel_target(["127.0.0.1:1", "localhost:2"]) == ("ipv4:127.0.0.1:1,127.0.0.1:2", True)
    assert channel_target("127.0.0.1:1,127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", True)
    assert channel_target(["[::1]:1", "[::1]:2"]) == ("ipv6:[::1]:1,[::1]:2", True)
    assert channel_target("dns:///gradserve.internal:50051") == ("dns:///gradserve.internal:50051", True)
    with pytest.raises(ValueError, match="mix of IPv4 and IPv6"):
        channel_target(["127.0.0.1:1", "[::1]:2"])
    with pytest.raises(ValueError, match="host:port"):
        channel_target(["127.0.0.1", "127.0.0.2:1"])


# -- typed options -------------------------------------------------------------------------------
@pytest.mark.parametrize("method, field, kwargs", [
    ("integrated_gradients", "steps", {"steps": 0}),
    ("integrated_gradients", "steps", {"steps": -3}),
    ("smoothgrad", "samples", {"samples": 0}),
    ("smoothgrad", "samples", {"samples": -1}),
    ("smoothgrad", "steps", {"steps": 0, "base_method": "integrated_gradients"}),
    ("smoothgrad", "steps", {"steps": 0}),           # checked even where base_method does not use it
    ("integrated_gradients", "steps", {"steps": 2.5}),
    ("integrated_gradients", "steps", {"steps": True}),
])
def test_explicit_steps_or_samples_below_one_are_refused(method, field, kwargs):
    with pytest.raises(gradserve.InvalidArgument, match=f"{field}: must be a positive int"):
        build_call(DENSE2, "dense2", method, np.ones((1, 4)), **kwargs)


def test_none_steps_and_samples_leave_the_servers_default_and_others_are_sent():
    default = build_call(DENSE2, "dense2", "integrated_gradients", np.ones((1, 4))).request
    assert default.integrated_gradients.steps == 0   # unset: the server's default
    assert build_call(DENSE2, "dense2", "integrated_gradients", np.ones((1, 4)), steps=7,
                      quadrature="riemann_left").request.integrated_gradients.steps == 7
    sg = build_call(DENSE2, "dense2", "smoothgrad", np.ones((1, 4)), samples=3, seed=5, noise=0.2).request.smoothgrad
    assert (sg.samples, sg.seed, sg.base_method) == (3, 5, pb2.METHOD_GRADIENT)
    assert abs(sg.noise - 0.2) < 1e-7
    assert build_call(DENSE2, "dense2", "smoothgrad", np.ones((1, 4))).request.smoothgrad.samples == 0


def test_options_are_typed_frozen_and_hashable():
    from gradserve._options import ComputeOptions, Selection

    a = ComputeOptions.of("gradient", target=np.array([1, 0]), output=np.int64(0), wrt=["input"])
    b = ComputeOptions("gradient", 0, Selection((1, 0), 0), ("input",))
    assert a == b and hash(a) == hash(b) and a.selection is not None and a.selection.target == (1, 0)
    with pytest.raises(AttributeError):
        a.version = 2   # type: ignore[misc]
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        ComputeOptions.of("integrated_gradients", stepz=3)
    with pytest.raises(gradserve.InvalidArgument, match="wrt: expected a sequence"):
        ComputeOptions("gradient", wrt="input")


def test_the_deprecated_method_name_of_the_quadrature_warns_and_conflicts_are_refused():
    from gradserve._options import quadrature_of

    assert quadrature_of("riemann_left", None) == "riemann_left"
    with pytest.warns(DeprecationWarning, match="quadrature="):
        assert quadrature_of("gausslegendre", "riemann_trapezoid") == "riemann_trapezoid"
    with pytest.warns(DeprecationWarning), pytest.raises(gradserve.InvalidArgument, match="pass quadrature only"):
        quadrature_of("riemann_left", "riemann_right")


# -- retries: one table ----------------------------------------------------------------------------
def test_one_table_of_retryable_codes_feeds_the_channel_and_the_streams():
    import json

    from gradserve._channel import RETRYABLE_CODES, channel_options

    config = json.loads(dict(channel_options(1 << 20, False))["grpc.service_config"])
    codes = config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"]
    assert {getattr(grpc.StatusCode, c) for c in codes} == set(RETRYABLE_CODES)
    for code in grpc.StatusCode:
        book = _book()
        assert (book.restart_delay(code) is not None) == (code in RETRYABLE_CODES), code


def test_stream_restart_decisions():
    book = _book()
    assert book.restart_delay(grpc.StatusCode.INTERNAL) is None
    book.write_failed = True   # grpc.aio: a write failed while the stream ended (reported as INTERNAL)
    assert book.restart_delay(grpc.StatusCode.INTERNAL) is not None
    book.restart()
    assert not book.write_failed and book.generation == 1
    for _ in range(3):   # 4 retries without an answer in between, then the error is raised
        assert book.restart_delay(grpc.StatusCode.UNAVAILABLE) is not None
    assert book.restart_delay(grpc.StatusCode.UNAVAILABLE) is None
    book.pull(np.ones((1, 4)))
    book.answer(_answer(0, 1.0))   # an answer resets the count
    assert book.restart_delay(grpc.StatusCode.UNAVAILABLE) is not None
    book.close()   # the caller stopped iterating: its cancel is never retried
    assert book.restart_delay(grpc.StatusCode.CANCELLED) is None


def test_stream_request_sides_stop_with_their_generation():
    book = _book(window=1)
    assert book.sending(0) and not book.must_wait(0)
    book.pull(np.ones((1, 4)))
    assert book.must_wait(0)             # the window is full
    book.restart()
    assert not book.must_wait(0) and not book.sending(0) and book.sending(1)
    book.end()
    assert not book.sending(1)


def test_stream_responses_are_read_from_bytes_with_in_band_errors():
    from gradserve._requests import decode_stream_response

    request_id, result = decode_stream_response(_answer(4, 2.0).SerializeToString())
    assert request_id == "4" and result.outputs["alpha"][0, 0] == 2.0
    failed = pb2.ComputeStreamResponse(request_id="5")
    failed.error.code = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    failed.error.message = "queue full"
    request_id, error = decode_stream_response(failed.SerializeToString())
    assert request_id == "5" and isinstance(error, gradserve.ResourceExhausted) and error.details == "queue full"
    with pytest.raises(gradserve.Internal, match="stream response"):
        decode_stream_response(_answer(4, 2.0).SerializeToString()[:-2])


# -- metadata --------------------------------------------------------------------------------------
def test_metadata_failures_back_off_and_only_not_found_and_unavailable_are_tolerated():
    from gradserve._core import MetadataCache

    cache = MetadataCache(initial=1000.0)
    assert cache.due("m")
    assert not cache.failed("m", from_status(grpc.StatusCode.UNAUTHENTICATED, "no token"))
    assert not cache.failed("m", from_status(grpc.StatusCode.PERMISSION_DENIED, "no"))
    assert cache.due("m")   # a raised error is not remembered
    assert cache.failed("m", from_status(grpc.StatusCode.NOT_FOUND, "model"))
    assert not cache.due("m") and cache.due("other")
    cache.store([DENSE2])   # a later fetch (models(), model_info()) ends the backoff
    assert cache.get("m") is DENSE2
    gone = MetadataCache(initial=0.0)
    assert gone.failed("m", from_status(grpc.StatusCode.UNAVAILABLE, "down")) and gone.due("m")
