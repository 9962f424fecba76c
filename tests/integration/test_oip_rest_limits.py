"""What a REST client may cost the server before its request is computed, at the limits' edges.

Raw sockets as the attacker (and httpx as a plain client), against real servers on loopback:
header size, header line and header count limits (431, in one read and line by line), idle,
header and body timeouts (408 and the connection closed), the connection limit (503), request
bodies held against the memory budget before they are read (429 before the body is sent) and
JSON arrays before they are allocated, strict JSON typing and out-of-range shapes (400, never
500, nothing logged as an internal error), Triton's NaN/Infinity and nested data, the streamed
decoder against the one-shot one, and clients that go away mid-body (logged once a minute).
Timeouts are short here; nothing waits on a fixed sleep except a trickling attacker's pace.
"""
from __future__ import annotations

import json
import logging
import select
import socket
import time
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import pytest

from subprocess_server import free_port

#: Header limits of the ``edges`` server, small enough to reach with a few lines.
MAX_HEAD, MAX_LINE, MAX_HEADERS = 2048, 512, 16
#: Its timeouts (idle, headers, body), in seconds.
TIMEOUT = 2.0
#: The ``budget`` server's memory budget, and its connection limit.
BUDGET = 1 << 20
MAX_CONNECTIONS = 6
PATH = "/v2/models/dense2/infer"


@pytest.fixture(scope="module")
def edges(start_server: Callable[..., Any]) -> Any:
    from gradserve.server.config import Limits, ServerConfig

    limits = Limits(http_max_header_bytes=MAX_HEAD, http_max_header_line_bytes=MAX_LINE,
                    http_max_headers=MAX_HEADERS, http_idle_timeout_s=TIMEOUT, http_header_timeout_s=TIMEOUT,
                    http_body_timeout_s=TIMEOUT)
    return start_server(ServerConfig(demo_models=True, http_port=free_port(), limits=limits))


@pytest.fixture(scope="module")
def budget(start_server: Callable[..., Any]) -> Any:
    from gradserve.server.config import Limits, ServerConfig

    limits = Limits(max_inflight_request_bytes=BUDGET, http_max_connections=MAX_CONNECTIONS,
                    http_idle_timeout_s=120, http_header_timeout_s=120, http_body_timeout_s=120)
    return start_server(ServerConfig(demo_models=True, http_port=free_port(), limits=limits))


def _port(server: Any) -> int:
    return int(server.server.rest.port)


@pytest.fixture()
def http(edges: Any) -> Iterator[httpx.Client]:
    # A connection per request: the server closes idle ones after TIMEOUT, and a request sent as
    # it does would fail for a reason that is not this test's.
    with httpx.Client(base_url=f"http://127.0.0.1:{_port(edges)}", timeout=60, headers={"Connection": "close"}) as c:
        yield c


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=60)


def _response(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next response on ``sock`` (status, body), or None when the server closed it without one."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, body
    except (ConnectionResetError, BrokenPipeError):
        return None


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (waits for it: the socket's own timeout bounds the wait)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def _send(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False when the server had closed the connection already."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def _body(rows: int = 1) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 4],
                                   "data": [1.0, 2.0, 3.0, 4.0] * rows}]}).encode()


def _post(body: bytes, headers: bytes = b"", path: str = PATH) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode() + headers
            + b"\r\n" + body)


def _health(extra: bytes = b"", lead: bytes = b"") -> bytes:
    return lead + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"


# -- item 1: headers are bounded ------------------------------------------------------------------------
def _padded_head(total: int, lead: bytes = b"") -> bytes:
    """A health request of exactly ``total`` head bytes (its blank line included), its lines short."""
    head = lead + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"
    i = 0
    while total - len(head) > 250:
        head += f"X-{i:02d}: ".encode() + b"v" * 190 + b"\r\n"
        i += 1
    return head + b"X: " + b"v" * (total - len(head) - len(b"X: \r\n\r\n")) + b"\r\n\r\n"


@pytest.mark.parametrize("lead", [b"", b"\r\n"], ids=["one read", "line by line"])
def test_header_bytes_at_the_limit(edges: Any, lead: bytes) -> None:
    # A leading empty line (ignored by HTTP) makes the server count the head line by line.
    for total, expected in ((MAX_HEAD, 200), (MAX_HEAD + 1, 431)):
        head = _padded_head(total, lead)
        assert len(head) == total and head.count(b"\r\n") - 2 - (lead != b"") <= MAX_HEADERS
        with _connect(_port(edges)) as s:
            s.sendall(head)
            answer = _response(s)
            assert answer is not None and answer[0] == expected, (total, answer)
            if expected == 431:
                assert b"--http-max-header-bytes" in answer[1] and _closed(s)


@pytest.mark.parametrize("lead", [b"", b"\r\n"], ids=["one read", "line by line"])
def test_header_line_at_the_limit(edges: Any, lead: bytes) -> None:
    for size, expected in ((MAX_LINE, 200), (MAX_LINE + 1, 431)):
        line = b"X-Long: " + b"v" * (size - len(b"X-Long: "))
        with _connect(_port(edges)) as s:
            s.sendall(_health(line + b"\r\n", lead))
            answer = _response(s)
            assert answer is not None and answer[0] == expected, (size, answer)
            if expected == 431:
                assert b"--http-max-header-line-bytes" in answer[1]
    # The request line is a line too.
    with _connect(_port(edges)) as s:
        s.sendall(lead + b"GET /v2/health/live?" + b"q" * MAX_LINE + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _response(s)
        assert answer is not None and answer[0] == 431


@pytest.mark.parametrize("lead", [b"", b"\r\n"], ids=["one read", "line by line"])
def test_header_count_at_the_limit(edges: Any, lead: bytes) -> None:
    for count, expected in ((MAX_HEADERS, 200), (MAX_HEADERS + 1, 431)):
        extra = b"".join(f"X-{i}: v\r\n".encode() for i in range(count - 1))   # Host is one
        with _connect(_port(edges)) as s:
            s.sendall(_health(extra, lead))
            answer = _response(s)
            assert answer is not None and answer[0] == expected, (count, answer)
            if expected == 431:
                assert b"--http-max-headers" in answer[1]


def test_header_flood_a_few_bytes_at_a_time_is_refused(edges: Any) -> None:
    """A head that arrives a few bytes at a time is counted across reads."""
    with _connect(_port(edges)) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        sent = 0
        while sent < 4 * MAX_HEAD and _send(s, b"a:") and _send(s, b"b\r\n"):   # 4x the limit, never the blank line
            sent += 5
        answer = _response(s)
        assert answer is None or (answer[0] == 431 and b"--http-max-header" in answer[1]), answer
        assert _closed(s)


def test_one_huge_header_value_is_refused(edges: Any) -> None:
    with _connect(_port(edges)) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        while sent < (30 << 20) and _send(s, b"v" * 65536):
            sent += 65536
        assert sent < (30 << 20), "a 30 MB header value was read to its end"
        answer = _response(s)
        assert answer is None or answer[0] == 431


def test_keep_alive_requests_are_counted_one_by_one(edges: Any) -> None:
    """Each request's head has the whole limit: a connection serves many requests."""
    with _connect(_port(edges)) as s:
        for _ in range(3):
            s.sendall(_padded_head(MAX_HEAD))
            answer = _response(s)
            assert answer is not None and answer[0] == 200


# -- item 5: timeouts and the connection limit ----------------------------------------------------------
def test_an_idle_connection_is_closed(edges: Any) -> None:
    with _connect(_port(edges)) as s:
        assert _closed(s)   # never sent a byte
    with _connect(_port(edges)) as s:
        s.sendall(_health())
        assert _response(s) == (200, b'{"live":true}')
        s.sendall(_health())   # keep-alive: the connection serves another request
        assert _response(s) == (200, b'{"live":true}')
        assert _closed(s)      # then, idle, is closed


def test_slow_headers_get_408(edges: Any) -> None:
    with _connect(_port(edges)) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")   # and never the blank line
        answer = _response(s)
        assert answer is not None and answer[0] == 408 and b"--http-header-timeout" in answer[1]
        assert _closed(s)


def test_slow_body_gets_408(edges: Any) -> None:
    body = _body()
    with _connect(_port(edges)) as s:
        s.sendall(_post(body)[:-len(body)])
        sent = 0
        deadline = time.monotonic() + 30 * TIMEOUT
        while sent < len(body) - 1 and time.monotonic() < deadline:   # 1 byte every 0.2 s, never the last
            if not _send(s, body[sent:sent + 1]):
                break
            sent += 1
            if select.select([s], [], [], 0.2)[0]:   # the server answered (or closed)
                break
        answer = _response(s)
        assert answer is None or (answer[0] == 408 and b"--http-body-timeout" in answer[1]), answer
        assert sent < len(body) - 1, "the trickle was never cut off"


def test_unfinished_bodies_are_released(edges: Any) -> None:
    """Connections holding unfinished bodies are closed at the body timeout, and what their bodies
    held against the memory budget is given back."""
    memory = edges.server.envelope.memory
    socks = []
    try:
        for _ in range(8):
            s = _connect(_port(edges))
            s.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {8 << 20}\r\n\r\n".encode())
            s.sendall(b" " * (1 << 20))
            socks.append(s)
        deadline = time.monotonic() + 60
        while memory.held < 8 * (8 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert memory.held >= 8 * (8 << 20)   # declared lengths are held before the bodies arrive
        for s in socks:
            answer = _response(s)
            assert answer is None or answer[0] == 408
        deadline = time.monotonic() + 60
        while memory.held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert memory.held == 0
    finally:
        for s in socks:
            s.close()


def test_connection_limit(budget: Any) -> None:
    port = _port(budget)
    socks = [_connect(port) for _ in range(MAX_CONNECTIONS)]
    try:
        for s in socks:   # each is served
            s.sendall(_health())
            assert _response(s) == (200, b'{"live":true}')
        with _connect(port) as extra:
            answer = _response(extra)
            assert answer is not None and answer[0] == 503 and b"--http-max-connections" in answer[1]
            assert _closed(extra)
        socks.pop().close()
        # The server sees the close soon; until then a new connection may still be refused.
        deadline = time.monotonic() + 60
        answer = None
        while time.monotonic() < deadline:
            with _connect(port) as again:
                again.sendall(_health())
                answer = _response(again)
            if answer is not None and answer[0] == 200:
                break
            time.sleep(0.05)
        assert answer == (200, b'{"live":true}')
    finally:
        for s in socks:
            s.close()


# -- item 2: bodies are held against the memory budget before they are read -----------------------------
def _wait_held(server: Any, nbytes: int) -> None:
    memory = server.server.envelope.memory
    deadline = time.monotonic() + 60
    while memory.held < nbytes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert memory.held >= nbytes


def test_declared_bodies_are_held_before_they_are_read(budget: Any) -> None:
    port = _port(budget)
    held = 600 * 1024
    with _connect(port) as first:
        # The first request's body is on its way: its declared length is held.
        first.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {held}\r\n\r\n".encode() + b" " * 1000)
        _wait_held(budget, held)
        for size, refused in ((BUDGET - held + 1, True), (BUDGET - held, False)):
            with _connect(port) as second:
                second.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
                if refused:   # answered before a byte of its body is sent
                    answer = _response(second)
                    assert answer is not None and answer[0] == 429, answer
                    assert b"--max-inflight-request-bytes" in answer[1]
                else:
                    second.sendall(b" " * (size - 2) + b"{}")
                    answer = _response(second)
                    assert answer is not None and answer[0] == 400 and b"missing input" in answer[1], answer
        first.sendall(b" " * (held - 1000 - 2) + b"{}")
        answer = _response(first)
        assert answer is not None and answer[0] == 400
    assert budget.server.envelope.memory.held == 0


def test_chunked_bodies_are_held_as_they_grow(budget: Any) -> None:
    port = _port(budget)
    held = 600 * 1024
    with _connect(port) as first:
        first.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {held}\r\n\r\n".encode())
        _wait_held(budget, held)
        with _connect(port) as second:
            second.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b" " * 65536
            for _ in range(16):   # 1 MiB in all: past the budget on top of the first
                if not _send(second, b"%x\r\n%s\r\n" % (len(chunk), chunk)):
                    break
            answer = _response(second)
            assert answer is not None and answer[0] == 429, answer
        first.close()


def test_json_arrays_are_held_before_they_are_allocated(budget: Any) -> None:
    """A JSON body's values are held at their datatype's size before the array is made: 200 KB of
    "0," as FP64 is 800 KB."""
    port = _port(budget)
    values = 100 * 1024
    body = (b'{"inputs":[{"name":"input","datatype":"FP64","shape":[%d,4],"data":[' % (values // 4)
            + b",".join([b"0"] * values) + b"]}]}")
    held = 300 * 1024
    with _connect(port) as first:
        first.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {held}\r\n\r\n".encode())
        _wait_held(budget, held)
        with _connect(port) as second:   # body and values: 1 MB, on top of the first's 300 KB
            second.sendall(_post(body))
            answer = _response(second)
            assert answer is not None and answer[0] == 429, answer
    with _connect(port) as alone:   # alone, it is admitted (and refused for its dtype)
        alone.sendall(_post(body))
        answer = _response(alone)
        assert answer is not None and answer[0] == 400 and b"float64" in answer[1], answer


# -- item 6: 400, never 500 -----------------------------------------------------------------------------
def _inputs(*items: dict[str, Any], method: str = "predict") -> dict[str, Any]:
    return {"parameters": {"method": method}, "inputs": list(items)}


def _x(shape: Any = (1, 4), data: Any = (1, 2, 3, 4), name: str = "input", datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": list(data)}


_BAD_SHAPES = {"2^63": "9223372036854775808", "2^64": "18446744073709551616", "1e20": "1e20",
               "4001 digits": "9" * 4001, "Infinity": "Infinity", "-Infinity": "-Infinity", "NaN": "NaN",
               "1.9": "1.9", "string": '"1"', "bool": "true", "null": "null"}


def _with_shape(name: str, dim: str, method: str = "predict") -> str:
    """A request whose input ``name`` has the shape [dim, 4] (text put in as it is)."""
    items = [_x()]
    if name != "input":
        items.append(_x(name=name))
    body = json.dumps(_inputs(*items, method=method))
    marker = json.dumps({"name": name, "datatype": "FP32", "shape": [1, 4]})[:-1]
    return body.replace(marker, marker.replace("[1, 4]", f"[{dim}, 4]"))


def _pad(body: str) -> str:
    """``body`` made larger than the one-shot JSON size with spaces (the streamed decoder's path)."""
    from gradserve.server.frontends.oip import jsonbody

    return body[:-1] + " " * (jsonbody.SMALL_BYTES + 1) + body[-1]


@pytest.fixture()
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.WARNING):
        yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("size", ["small", "streamed"])
@pytest.mark.parametrize("dim", list(_BAD_SHAPES))
@pytest.mark.parametrize("name, method", [("input", "predict"), ("tangents/input", "jvp"), ("cotangents", "vjp")])
def test_shapes_beyond_int64_or_not_integers_are_400(http: httpx.Client, no_internal_errors: None, size: str,
                                                     dim: str, name: str, method: str) -> None:
    body = _with_shape(name, _BAD_SHAPES[dim], method)
    assert f"[{_BAD_SHAPES[dim]}, 4]" in body
    response = http.post(PATH, content=_pad(body) if size == "streamed" else body)
    assert response.status_code == 400, response.text
    assert ".shape: dimension 0" in response.json()["error"] or "not valid JSON" in response.json()["error"]


_BAD_DATA = {
    "strings": (_x(data=["1", "2", "3", "4"]), "expected numbers, got string '1'", "expected numbers, got string"),
    "null": (_x(data=[None, 2, 3, 4]), "expected numbers, got null None", "found 'u'"),
    "bool among numbers": (_x(data=[True, 2, 3, 4]), "expected numbers, got bool True", "found 'r'"),
    "float as INT32": (_x(data=[1.5, 2, 3, 4], datatype="INT32"), "expected integers, got float 1.5", "found '.'"),
    "exponent as INT64": (_x(data=[1e3, 2, 3, 4], datatype="INT64"), "expected integers, got float 1000.0",
                          "found '.'"),
    "number as BOOL": (_x(data=[1, 0, 1, 0], datatype="BOOL"), "expected true or false, got int 1", "found '1'"),
    "INT8 out of range": (_x(data=[300, 2, 3, 4], datatype="INT8"), "not INT8 values", "not INT8 values"),
    "beyond int64": (_x(data=[2 ** 64, 2, 3, 4], datatype="INT64"), "not INT64 values", "not INT64 values"),
    "object": (_x(data=[{"a": 1}, 2, 3, 4]), "expected numbers, got object", "expected numbers, got object"),
    "too many": (_x(data=[1, 2, 3, 4, 5]), "5 values but shape [1, 4] needs 4", "more than the 4 values"),
}


@pytest.mark.parametrize("size", ["small", "streamed"])
@pytest.mark.parametrize("case", list(_BAD_DATA))
def test_json_data_is_strictly_typed(http: httpx.Client, no_internal_errors: None, size: str, case: str) -> None:
    item, small_error, streamed_error = _BAD_DATA[case]
    body = json.dumps(_inputs(item))
    response = http.post(PATH, content=_pad(body) if size == "streamed" else body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error.startswith("inputs['input'].data: ")
    assert (small_error if size == "small" else streamed_error) in error


def test_json_syntax_inside_data_is_checked(http: httpx.Client, no_internal_errors: None) -> None:
    cases = ["[1,,2,3,4]", "[1 2,3,4]", "[[1,2],[3,4]][0]", "[1,2,3,4,]", "[[1,2]3,4]", "[01,2,3,4]",
             "[1,2,3,4", "[1.2.3,2,3,4]", "[-,2,3,4]", "[nan,2,3,4]"]
    for data in cases:
        body = '{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":' + data + '}]}'
        for content in (body, _pad(body)):
            response = http.post(PATH, content=content)
            assert response.status_code == 400, (data, len(content), response.text)


@pytest.mark.parametrize("size", ["small", "streamed"])
def test_nan_infinity_and_nested_data_as_triton_reads_them(http: httpx.Client, size: str) -> None:
    # NaN and Infinity are what Python's JSON writer (and tritonclient's) produce for them;
    # nested arrays are read in row-major order, whatever their nesting.
    body = ('{"inputs":[{"name":"input","datatype":"FP32","shape":[3,4],'
            '"data":[[1,2,3,4],[[NaN],[-Infinity, 1e0, 2]], [], [5e-1, 0.5, 0.5, 0.5], [[[]]]]}]}')
    response = http.post(PATH, content=_pad(body) if size == "streamed" else body)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]["data"]
    assert out[0] == pytest.approx(5.1) and np.isnan(out[1]) and out[2] == pytest.approx(1.1)


def test_the_streamed_decoder_answers_as_the_one_shot_one(http: httpx.Client) -> None:
    """A large JSON body (several steps of the streamed decoder) against the closed form of dense2
    (0.5 * sum(x) + 0.1)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20000, 4)).astype(np.float32)
    body = json.dumps({"id": "big", "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                                 "data": x.tolist()}],
                       "outputs": [{"name": "alpha"}]})
    from gradserve.server.frontends.oip import jsonbody

    assert len(body) > 3 * jsonbody.CHUNK_BYTES
    response = http.post(PATH, content=body)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["id"] == "big"
    np.testing.assert_allclose(np.asarray(doc["outputs"][0]["data"]).ravel(), 0.5 * x.sum(axis=1) + 0.1,
                               rtol=1e-5, atol=1e-5)


def test_decoder_values_of_every_datatype() -> None:
    """``jsonbody.values`` gives the same arrays streamed and one-shot, chunk edges included."""
    import ml_dtypes

    from gradserve.server.frontends.oip import jsonbody

    cases = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "BF16": ml_dtypes.bfloat16,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
             "BOOL": np.bool_}
    rng = np.random.default_rng(0)
    for datatype, dtype in cases.items():
        if datatype == "BOOL":
            flat = rng.random(200_000) < 0.5
        elif datatype.startswith(("INT", "UINT")):
            info = np.iinfo(dtype)
            flat = rng.integers(info.min, info.max, 200_000, dtype=dtype, endpoint=True)
        else:
            flat = rng.normal(size=200_000).astype(dtype)
        nested = flat.reshape(-1, 8).tolist()
        text = json.dumps({"inputs": [{"name": "x", "data": nested, "datatype": datatype}]}).encode()
        doc = jsonbody.run(jsonbody.load(text, len(text), 1 << 20))
        raw = doc["inputs"][0]["data"]
        assert isinstance(raw, jsonbody.RawData)
        streamed = jsonbody.run(jsonbody.values(raw, datatype, np.dtype(dtype), flat.size, "x"))
        one_shot = jsonbody.run(jsonbody.values(nested, datatype, np.dtype(dtype), flat.size, "x"))
        assert streamed.dtype == one_shot.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(streamed, flat)
        np.testing.assert_array_equal(one_shot, flat)


def test_streamed_and_one_shot_decoders_agree_on_random_data() -> None:
    """Random nested arrays, valid and mutated (stray tokens, deletions, strings, null, braces):
    the streamed decoder accepts exactly what the one-shot one accepts, with the same values."""
    import random

    from gradserve.server.core.errors import InvalidArgumentError
    from gradserve.server.frontends.oip import jsonbody

    rng = random.Random(20)
    stray = ["1", "-2", "3.5", "1e3", "NaN", "Infinity", "-Infinity", "true", "false", "null", '"x"', "[", "]", ",",
             " ", "\n", "01", "1.", ".5", "-", "1e", "{}", "[]", "2e400", "99999999999999999999", "300"]

    def nested(depth: int = 0) -> str:
        if depth > 3 or rng.random() < 0.5:
            return rng.choice(["1", "-2", "3.5", "1e3", "NaN", "Infinity", "true", "false", "0", "-0.25", "127"])
        items = [nested(depth + 1) for _ in range(rng.randint(0, 4))]
        return "[" + rng.choice([",", ", ", " ,", ",\n"]).join(items) + "]"

    def decode(text: bytes, datatype: str, dtype: Any) -> Any:
        try:
            doc = jsonbody.run(jsonbody.load(text, len(text), 1 << 20))
            return jsonbody.run(jsonbody.values(doc["inputs"][0]["data"], datatype, np.dtype(dtype), 64, "x")).tolist()
        except InvalidArgumentError:
            return None

    dtypes = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT8": np.int8, "BOOL": np.bool_}
    accepted = 0
    for _ in range(3000):
        data = "[" + nested() + "]"
        for _ in range(rng.randint(0, 3)):
            i = rng.randint(0, len(data))
            data = data[:i] + rng.choice(stray) + data[i + rng.randint(0, 1):]
        datatype = rng.choice(list(dtypes))
        body = '{"inputs":[{"name":"x","datatype":"%s","shape":[4],"data":%s}]}' % (datatype, data)
        one_shot = decode(body.encode(), datatype, dtypes[datatype])
        streamed = decode(_pad(body).encode(), datatype, dtypes[datatype])
        assert (one_shot is None) == (streamed is None), (datatype, data, one_shot, streamed)
        if one_shot is not None:
            accepted += 1
            dtype = dtypes[datatype]
            np.testing.assert_array_equal(np.asarray(streamed, dtype), np.asarray(one_shot, dtype))
    assert 200 < accepted < 2800   # both kinds were drawn


def test_json_outside_data_at_its_limit(start_server: Callable[..., Any]) -> None:
    from gradserve.server.config import Limits, ServerConfig

    limit = 100 * 1024
    server = start_server(ServerConfig(demo_models=True, http_port=free_port(),
                                       limits=Limits(http_max_json_outside_data_bytes=limit)))
    data = json.dumps([0.5] * 40000)   # set aside: not counted
    head = '{"inputs":[{"name":"input","datatype":"FP32","shape":[10000,4],"data":'
    tail = '}],"id":"'
    for extra, status in ((0, 200), (1, 413)):
        body = head + data + tail + "i" * (limit - len(head) - len(tail) - len('"}') + extra) + '"}'
        assert len(body) - len(data) == limit + extra
        response = httpx.post(f"http://127.0.0.1:{_port(server)}{PATH}", content=body, timeout=60)
        assert response.status_code == status, response.text
        if status == 413:
            assert "--http-max-json-outside-data-bytes" in response.json()["error"]
        else:
            np.testing.assert_allclose(response.json()["outputs"][0]["data"], [1.1] * 10000, rtol=1e-5)


def test_inference_header_content_length_must_be_ascii_digits(http: httpx.Client, no_internal_errors: None) -> None:
    for value in (b"\xb2", "²".encode(), b"9" * 400, b"1" * 25, b"-1", b"0x10"):   # 400: within MAX_LINE
        response = http.post(PATH, content=b'{"inputs":[]}', headers={b"Inference-Header-Content-Length": value})
        assert response.status_code == 400, (value[:8], response.text)
        assert response.json()["error"].startswith("Inference-Header-Content-Length: ")


# -- a client that goes away mid-body -------------------------------------------------------------------
def test_a_client_gone_mid_body_is_not_a_traceback(edges: Any, caplog: pytest.LogCaptureFixture) -> None:
    registry = edges.server.metrics.registry
    labels = {"protocol": "oip-rest", "model": "unknown", "method": "invalid", "code": "CANCELLED"}
    before = registry.get_sample_value("gradserve_requests_total", labels) or 0.0
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            with _connect(_port(edges)) as s:
                s.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode() + b" " * 10)
        deadline = time.monotonic() + 60
        while (registry.get_sample_value("gradserve_requests_total", labels) or 0.0) < before + 5 \
                and time.monotonic() < deadline:
            time.sleep(0.02)
    assert (registry.get_sample_value("gradserve_requests_total", labels) or 0.0) == before + 5
    records = [r for r in caplog.records if r.name.startswith("gradserve")]
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
    assert len([r for r in records if "abandoned" in r.getMessage()]) <= 1


def test_cli_flags() -> None:
    from gradserve.server.config import Limits
    from gradserve.server.process.cli import _limits, build_parser

    defaults = _limits(build_parser().parse_args(["serve"]))
    assert defaults == Limits()
    args = build_parser().parse_args([
        "serve", "--http-max-header-bytes", "1000", "--http-max-header-line-bytes", "100", "--http-max-headers", "7",
        "--http-max-connections", "3", "--http-idle-timeout", "2.5", "--http-header-timeout", "3",
        "--http-body-timeout", "4", "--http-max-json-outside-data-bytes", "5000"])
    limits = _limits(args)
    assert (limits.http_max_header_bytes, limits.http_max_header_line_bytes, limits.http_max_headers,
            limits.http_max_connections, limits.http_idle_timeout_s, limits.http_header_timeout_s,
            limits.http_body_timeout_s, limits.http_max_json_outside_data_bytes) == (1000, 100, 7, 3, 2.5, 3.0, 4.0,
                                                                                     5000)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--http-max-header-bytes", "0"])
