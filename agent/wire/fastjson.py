"""JSON for inference payloads at orjson's speed where orjson is installed, with the standard library's answers.

Why: on the MQTT serving path the stdlib's ``json`` was the largest single cost of a JSON request after the
model's own call (decoding 64 floats and encoding 10 took about half of the agent's 40 µs of Python per request,
measured in process). orjson parses and writes the same JSON several times faster, and writes numpy arrays
itself, without a list of Python floats in between.

The same messages are accepted and refused either way: where orjson refuses a text the stdlib reads (NaN and
Infinity literals, lone surrogates, UTF-16, nesting past 1024) the stdlib reads it again and decides, with its own
error; where orjson would write what the stdlib does not (``null`` for NaN or infinity, which the stdlib writes as
``NaN`` and ``Infinity``), the stdlib writes the message. What remains differs in how values are written: a float32 (or
float16) array is written with the shortest digits that read back as the same float32 (``0.20693526``, where the
stdlib wrote the float64 ``0.20693525671958923`` of the same value; a float16 0.1 as ``0.099975586``, not
``0.0999755859375``), an integer past 64 bits is read as a float, and non-ASCII text is written as UTF-8, not
``\\uXXXX`` escapes.
Without orjson (it is a dependency of the agent on the platforms it has wheels for) the stdlib does it all.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

__all__ = ["FAST", "dumps", "loads", "tensor"]

try:
    import orjson
except ImportError:  # a platform without orjson's wheels: the stdlib, slower, the same messages
    orjson = None  # type: ignore[assignment]

FAST = orjson is not None
_NUMPY = orjson.OPT_SERIALIZE_NUMPY if orjson is not None else 0


def loads(raw: bytes | bytearray | memoryview) -> Any:
    """``json.loads(raw)``: raises what it raises (``ValueError``, ``UnicodeDecodeError``, ``RecursionError``)."""
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the stdlib decides, with its own error or its own reading (NaN)
    return json.loads(bytes(raw) if isinstance(raw, memoryview) else raw)


def dumps(obj: Any) -> bytes:
    """``json.dumps(obj, allow_nan=True)`` as UTF-8 bytes, compact; numpy arrays written as nested lists."""
    if orjson is not None:
        try:
            out = orjson.dumps(obj, option=_NUMPY)
        except TypeError:  # a 0-d or strided array, a key that is not a string: the stdlib's way below
            pass
        else:
            if b"null" not in out or not _non_finite(obj):  # orjson writes NaN and infinities as null: the stdlib's way
                return out
    return json.dumps(obj, allow_nan=True, separators=(",", ":"), default=_listed).encode()


def _non_finite(obj: Any) -> bool:
    """Whether ``obj`` holds a NaN or an infinity (a float, a numpy scalar or an array element) anywhere: what decides
    the stdlib's path once orjson wrote a ``null``. Why not the text alone: a string or a None reads ``null`` too (a
    client's request id), and the stdlib's path costs 14 times orjson's on a large output."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, np.ndarray):
            if item.dtype.kind in "fc" and not np.isfinite(item).all():
                return True
        elif isinstance(item, (float, np.floating)) and not math.isfinite(item):
            return True
    return False


def tensor(arr: np.ndarray) -> Any:
    """What ``dumps`` should be given for ``arr``: the array itself where orjson writes it, else nested lists."""
    if orjson is not None and arr.ndim and arr.flags.c_contiguous:
        return arr
    return arr.tolist()


def _listed(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
