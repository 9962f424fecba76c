"""JSON bodies of OIP REST inferences: strict typing, decoded in bounded steps.

``json.loads`` holds the interpreter for the whole document and builds a Python object per
value (a 60 MB body of numbers stopped the event loop, health checks included, for seconds and
took about ten times its size). Here a body is decoded as a generator that yields between steps
of at most ``CHUNK_BYTES`` (``drive`` awaits between them), and no step builds more than a
chunk's worth of Python objects:

- a body of at most ``SMALL_BYTES`` is one ``json.loads`` (the common case, no extra work);
- a larger one is scanned for its structure: the inputs' ``data`` arrays are set aside by their
  place in the body (their ends found with NumPy, ``CHUNK_BYTES`` at a time), and the rest of
  the document (names, shapes, parameters, outputs: at most ``http_max_json_outside_data_bytes``)
  is read by ``json.loads``;
- ``values`` turns an input's data into a flat array of its datatype: a set-aside array is
  checked byte class by byte class and token pair by token pair with NumPy, then its numbers
  are read a chunk at a time straight into the array.

Typing is strict either way: FP data are JSON numbers (and the ``NaN``/``Infinity`` that
Python's and tritonclient's JSON writers produce), INT and UINT data integers, BOOL data
``true``/``false``; strings, ``null``, booleans among numbers and numbers among booleans are
refused. Nested arrays are read in row-major order, as Triton reads them: only the number of
values has to match the shape.
"""
from __future__ import annotations

import asyncio
import json
import mmap
import re
from dataclasses import dataclass
from typing import Any, Callable, Generator, TypeVar, Union

import numpy as np

from gradserve.server.core.errors import InvalidArgumentError, ResourceExhaustedError

__all__ = ["RawData", "document", "array", "load", "values", "drive", "run", "OutsideDataTooLarge",
           "SMALL_BYTES", "CHUNK_BYTES"]

#: A JSON body (or JSON header of a binary body) of at most this many bytes is one json.loads.
SMALL_BYTES = 64 * 1024
#: The most bytes one step of a larger body decodes before it yields.
CHUNK_BYTES = 256 * 1024
#: Structural tokens read before a step yields.
_TOKENS_PER_STEP = 4096

T = TypeVar("T")
#: A body: bytes, or a buffer as the server reads one (slices of it are bytes).
Text = Union[bytes, bytearray, mmap.mmap]
Steps = Generator[None, None, T]


class OutsideDataTooLarge(ResourceExhaustedError):
    """The JSON outside the inputs' data arrays is over its limit (HTTP 413)."""


@dataclass(frozen=True)
class RawData:
    """An input's ``data`` array set aside unparsed: ``text[start:end]``, brackets included."""

    text: Text
    start: int
    end: int


async def drive(steps: Steps[T]) -> T:
    """Run ``steps`` to its result, letting the event loop run between steps."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        await asyncio.sleep(0)


def run(steps: Steps[T]) -> T:
    """Run ``steps`` to its result at once (tests, and bodies known to be small)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def document(text: Text, end: int, outside_limit: int) -> Any:
    """``load``, awaited step by step (a small body at once)."""
    if end <= min(SMALL_BYTES, outside_limit):
        return _loads(text if end == len(text) and not isinstance(text, mmap.mmap) else text[:end])
    return await drive(load(text, end, outside_limit))


async def array(data: Any, datatype: str, dtype: np.dtype[Any], count: int, field: str,
                reserve: Callable[[int], None] = lambda nbytes: None) -> np.ndarray:
    """``values``, awaited step by step (a list or a value at once)."""
    if isinstance(data, RawData):
        return await drive(values(data, datatype, dtype, count, field, reserve))
    return _listed(data, datatype, dtype, field, reserve)


def _loads(text: bytes | bytearray) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgumentError(f"request: the body is not valid JSON ({str(exc)[:128]})") from None


# -- the document ------------------------------------------------------------------------------------
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:,]', re.DOTALL)


class _Frame:
    __slots__ = ("obj", "key", "want_key", "index")

    def __init__(self, obj: bool) -> None:
        self.obj = obj
        self.key: str | None = None
        self.want_key = obj
        self.index = 0


def _key(text: Text, start: int, end: int) -> str:
    raw = bytes(text[start + 1:end - 1])
    if b"\\" not in raw:
        return raw.decode("utf-8", "replace")
    try:
        return str(json.loads(text[start:end]))
    except ValueError:
        return ""


def load(text: Text, end: int, outside_limit: int) -> Steps[Any]:
    """The JSON document of ``text[:end]``; in a larger one, each input's ``data`` array is a
    ``RawData`` (see the module docstring). InvalidArgumentError for JSON that is not valid,
    ``OutsideDataTooLarge`` past ``outside_limit`` bytes outside the data arrays."""
    if end <= min(SMALL_BYTES, outside_limit):
        return _loads(text if end == len(text) and not isinstance(text, mmap.mmap) else text[:end])
    stack: list[_Frame] = []
    spans: dict[tuple[int, int], tuple[int, int]] = {}
    occurrence = 0     # the "inputs" key seen last (JSON keeps the last of a key given twice)
    pieces: list[bytes | bytearray] = []
    seg = pos = 0      # the outside part being scanned starts at seg
    outside = 0        # outside bytes before seg
    tokens = 0
    while True:
        stop = min(end, seg + (outside_limit - outside) + 1)
        m = _TOKEN.search(text, pos, stop)
        if m is None:
            if stop < end:
                raise OutsideDataTooLarge(f"request: more than {outside_limit} bytes of JSON outside the inputs' "
                                          "data arrays (--http-max-json-outside-data-bytes)")
            break
        p = m.start()
        c = text[p]
        top = stack[-1] if stack else None
        if c == 0x22:  # a string: a key, or a value nobody here needs
            if top is not None and top.obj and top.want_key:
                top.key, top.want_key = _key(text, p, m.end()), False
                if len(stack) == 1 and top.key == "inputs":
                    occurrence += 1
        elif c == 0x7B:
            stack.append(_Frame(True))
        elif c == 0x5B:
            if (len(stack) == 3 and stack[2].obj and stack[2].key == "data" and not stack[2].want_key
                    and not stack[1].obj and stack[0].obj and stack[0].key == "inputs"):
                close = yield from _array_end(text, p, end)
                if close is not None:
                    spans[(occurrence, stack[1].index)] = (p, close)
                    pieces += (text[seg:p], b"[]")
                    outside += p - seg
                    seg = pos = close
                    continue
            stack.append(_Frame(False))
        elif c in (0x7D, 0x5D):
            if stack:
                stack.pop()
        elif c == 0x2C and top is not None:
            if top.obj:
                top.want_key = True
            else:
                top.index += 1
        pos = m.end()
        tokens += 1
        if tokens % _TOKENS_PER_STEP == 0:
            yield
    if outside + end - seg > outside_limit:
        raise OutsideDataTooLarge(f"request: more than {outside_limit} bytes of JSON outside the inputs' "
                                  "data arrays (--http-max-json-outside-data-bytes)")
    pieces.append(text[seg:end])
    doc = _loads(b"".join(pieces))
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if isinstance(inputs, list):
        for i, item in enumerate(inputs):
            span = spans.get((occurrence, i))
            # Every array in a data place was set aside, so a list there is its stand-in.
            if span is not None and isinstance(item, dict) and type(item.get("data")) is list:
                item["data"] = RawData(text, *span)
    return doc


def _array_end(text: Text, start: int, end: int) -> Steps[int | None]:
    """The index after the ``]`` that closes the array opened at ``start``; None when a string or
    an object comes first (the array is then read with the rest of the document, to be refused
    there with the name of its input) or the array does not end."""
    depth, pos = 0, start
    while pos < end:
        stop = min(end, pos + CHUNK_BYTES)
        a = np.frombuffer(text, np.uint8, count=stop - pos, offset=pos)
        level = np.cumsum((a == 0x5B).view(np.int8) - (a == 0x5D).view(np.int8), dtype=np.int64)
        level += depth
        closed = np.flatnonzero(level == 0)
        n = int(closed[0]) + 1 if len(closed) else len(a)
        head = a[:n]
        if ((head == 0x22) | (head == 0x7B) | (head == 0x7D)).any():
            return None
        if len(closed):
            return pos + n
        depth, pos = int(level[-1]), stop
        yield
    return None


# -- the values --------------------------------------------------------------------------------------
_WS, _OPEN, _CLOSE, _COMMA, _SCALAR, _OTHER = 0, 1, 2, 3, 4, 5
_START = 0   # as the class before the first token


def _classes(scalar: bytes) -> np.ndarray:
    table = np.full(256, _OTHER, np.uint8)
    table[list(b" \t\r\n")] = _WS
    table[ord("[")], table[ord("]")], table[ord(",")] = _OPEN, _CLOSE, _COMMA
    table[list(scalar)] = _SCALAR
    return table


#: Token pairs (class before * 8 + class after) that JSON allows in arrays of values.
_PAIRS = np.zeros(64, bool)
for _before, _after in ((_START, _OPEN), (_OPEN, _SCALAR), (_OPEN, _OPEN), (_OPEN, _CLOSE), (_SCALAR, _COMMA),
                        (_SCALAR, _CLOSE), (_COMMA, _SCALAR), (_COMMA, _OPEN), (_CLOSE, _COMMA), (_CLOSE, _CLOSE)):
    _PAIRS[_before * 8 + _after] = True
_COMMAS = re.compile(rb",,+")


@dataclass(frozen=True)
class _Kind:
    what: str
    types: tuple[type, ...]
    table: np.ndarray


_NUMBERS = _Kind("numbers", (int, float), _classes(b"0123456789+-.eENaInfity"))
_INTEGERS = _Kind("integers", (int,), _classes(b"0123456789-"))
_BOOLEANS = _Kind("true or false", (bool,), _classes(b"truefals"))
_KINDS = {"FP16": _NUMBERS, "FP32": _NUMBERS, "FP64": _NUMBERS, "BF16": _NUMBERS, "BOOL": _BOOLEANS}


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", type(None): "null", dict: "object",
            list: "array"}.get(type(value), type(value).__name__)


def values(data: Any, datatype: str, dtype: np.dtype[Any], count: int, field: str,
           reserve: Callable[[int], None] = lambda nbytes: None) -> Steps[np.ndarray]:
    """A flat array of ``dtype`` of an input's JSON ``data`` (a ``RawData``, a list or a lone
    value), strictly typed for ``datatype``; ``reserve(nbytes)`` is called before the array is
    allocated. More values than ``count`` are refused as soon as they are seen; fewer are
    returned (the caller compares the size with the shape)."""
    if isinstance(data, RawData):
        return (yield from _parse(data, datatype, _KINDS.get(datatype, _INTEGERS), dtype, count, field, reserve))
    return _listed(data, datatype, dtype, field, reserve)


def _listed(data: Any, datatype: str, dtype: np.dtype[Any], field: str, reserve: Callable[[int], None]) -> np.ndarray:
    kind = _KINDS.get(datatype, _INTEGERS)
    if type(data) is not list:
        data = [data]
    if set(map(type, data)).issubset(kind.types):   # a flat list, the common case
        flat = data
    else:
        flat = []
        try:
            _flatten(data, kind, flat, field)
        except RecursionError:
            raise InvalidArgumentError(f"{field}: arrays nested too deeply") from None
    reserve(len(flat) * dtype.itemsize)
    return _convert(flat, datatype, dtype, field)


def _flatten(data: list[Any], kind: _Kind, out: list[Any], field: str) -> None:
    if set(map(type, data)).issubset(kind.types):
        out.extend(data)
        return
    for v in data:
        if type(v) is list:
            _flatten(v, kind, out, field)
        elif type(v) in kind.types:
            out.append(v)
        else:
            raise InvalidArgumentError(f"{field}: expected {kind.what}, got {_type_name(v)} {v!r:.32}")


#: Datatypes a JSON number can overflow into an infinity (FP64 holds every float; integers raise).
_NARROW = frozenset({"FP16", "FP32", "BF16"})


def _convert(flat: list[Any], datatype: str, dtype: np.dtype[Any], field: str,
             out: np.ndarray | None = None) -> np.ndarray:
    try:
        if datatype in _NARROW:
            with np.errstate(over="ignore"):  # beyond the datatype's range a number is an infinity
                return _fill(flat, dtype, out)
        return _fill(flat, dtype, out)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgumentError(f"{field}: not {datatype} values ({str(exc)[:128]})") from None


def _fill(flat: list[Any], dtype: np.dtype[Any], out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return np.asarray(flat, dtype=dtype)
    out[:] = flat
    return out


def _parse(data: RawData, datatype: str, kind: _Kind, dtype: np.dtype[Any], count: int, field: str,
           reserve: Callable[[int], None]) -> Steps[np.ndarray]:
    text, pos, end = data.text, data.start, data.end
    room = min(count, (end - pos - 1) // 2)   # a value takes at least two bytes with its separator
    reserve(room * dtype.itemsize)
    out = np.empty(room, dtype)
    filled, before = 0, _START
    while pos < end:
        seg = text[pos:min(end, pos + CHUNK_BYTES)]
        if pos + len(seg) < end:  # cut after the last separator: no value is split
            cut = max(seg.rfind(b","), seg.rfind(b"["), seg.rfind(b"]"))
            if cut < 0:
                raise InvalidArgumentError(f"{field}: a value or a space of more than {CHUNK_BYTES} bytes")
            seg = seg[:cut + 1]
        cls = kind.table[np.frombuffer(seg, np.uint8)]
        other = cls == _OTHER
        if other.any():
            raise InvalidArgumentError(f"{field}: expected {datatype} values ({kind.what}), found "
                                       f"{chr(seg[int(np.argmax(other))])!r}")
        at = np.flatnonzero(cls != _WS)
        tokens = cls[at]
        scalar = tokens == _SCALAR
        inside = scalar[1:] & scalar[:-1]   # a value's bytes after its first
        if (inside & (np.diff(at) != 1)).any():
            raise InvalidArgumentError(f"{field}: not valid JSON (values without a comma between them)")
        keep = np.ones(len(tokens), bool)
        keep[1:] = ~inside
        tokens = tokens[keep].astype(np.intp)
        if len(tokens):
            pairs = np.empty(len(tokens), np.intp)
            pairs[0] = before * 8 + tokens[0]
            pairs[1:] = tokens[:-1] * 8 + tokens[1:]
            if not _PAIRS[pairs].all():
                raise InvalidArgumentError(f"{field}: not valid JSON (a misplaced ',', '[' or ']')")
            before = int(tokens[-1])
        flat = seg.translate(None, b"[] \t\r\n")
        if b",," in flat:   # left by empty nested arrays: the pairs above refused any other
            flat = _COMMAS.sub(b",", flat)
        flat = flat.strip(b",")
        if flat:
            try:
                parsed = json.loads(b"[" + flat + b"]")
            except (ValueError, RecursionError) as exc:
                raise InvalidArgumentError(f"{field}: not valid JSON ({str(exc)[:128]})") from None
            n = len(parsed)
            if filled + n > room:
                raise InvalidArgumentError(f"{field}: more than the {count} values its shape needs")
            _convert(parsed, datatype, dtype, field, out[filled:filled + n])
            filled += n
        pos += len(seg)
        yield
    return out[:filled]
