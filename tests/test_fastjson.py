"""Inference payloads' JSON through orjson reads and writes what the standard library does (``agent.wire.fastjson``).

The stdlib is the reference: the serving path moved to orjson for speed, and a request must be accepted or refused
(with the same reading of its numbers) as it was, and a reply must read back as the same values.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.wire import fastjson
from agent.wire.inference import Reply, decode_reply, decode_request, encode_reply, encode_request

pytestmark = pytest.mark.skipif(not fastjson.FAST, reason="orjson is not installed: the stdlib is used, nothing to compare")

NUMBERS = st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=8)
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=4), max_leaves=20)


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values, NaN equal to NaN, and an int never equal to a float (the stdlib keeps the kind)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _stdlib(raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return "error", type(exc)


def _ours(raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", fastjson.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return "error", type(exc)


@settings(max_examples=400, deadline=None)
@given(VALUES, st.booleans())
def test_every_text_the_stdlib_writes_reads_back_the_same(value: Any, compact: bool) -> None:
    """NaN and Infinity literals (which orjson refuses) included: the stdlib reads those again."""
    raw = json.dumps(value, allow_nan=True, separators=(",", ":") if compact else None).encode()
    kind, ours = _ours(raw)
    assert kind == "ok" and _same(ours, json.loads(raw))


@settings(max_examples=600, deadline=None)
@given(
    st.binary(max_size=80)
    | st.text(alphabet='[]{}",:0123456789.eE+-tfrualsn \\/u NaInfity', max_size=60).map(str.encode)
    | st.text(max_size=30).map(lambda t: json.dumps(t, ensure_ascii=False).encode("utf-16"))
)
def test_any_bytes_are_accepted_or_refused_as_the_stdlib_does(raw: bytes) -> None:
    reference = _stdlib(raw)
    if reference[0] == "ok" and _has_huge_int(reference[1]):  # past 64 bits orjson reads a float: the documented difference
        return
    kind, ours = _ours(raw)
    assert kind == reference[0], (raw, reference, ours)
    if kind == "ok":
        assert _same(ours, reference[1])


def _has_huge_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**64
    if isinstance(value, list):
        return any(_has_huge_int(v) for v in value)
    if isinstance(value, dict):
        return any(_has_huge_int(v) for v in value.values())
    return False


DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.uint8, np.int32, np.int64, np.bool_])
ARRAYS = DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3)))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(alphabet="xyz_", min_size=1, max_size=5), ARRAYS, max_size=3), st.booleans())
def test_a_reply_reads_back_as_the_values_the_model_gave(outputs: dict[str, np.ndarray], strided: bool) -> None:
    """Every dtype the wire carries, 0-d, empty and strided arrays, NaN and infinities (written ``NaN`` and
    ``Infinity`` as the stdlib did, never ``null``): each value decodes to the same one of the output's dtype."""
    if strided:
        outputs = {k: np.repeat(v, 2, axis=-1)[..., ::2] if v.ndim else v for k, v in outputs.items()}
    raw = encode_reply(Reply("r1", "m", "1", outputs, 0.5))
    reply = json.loads(raw)  # the stdlib reads it: any client can
    for name, arr in outputs.items():
        stdlib = json.loads(json.dumps(arr.tolist(), allow_nan=True))  # the reply as the stdlib wrote it
        got = reply["outputs"][name]
        assert np.shape(got) == np.shape(stdlib)  # the same nesting (an empty array is [] both ways)
        np.testing.assert_array_equal(np.asarray(got, dtype=arr.dtype), np.asarray(stdlib, dtype=arr.dtype))
        if arr.size:
            np.testing.assert_array_equal(np.asarray(got, dtype=arr.dtype), arr)
    floats = [a for a in outputs.values() if a.dtype.kind == "f"]
    assert (b"NaN" in raw) == any(np.isnan(a).any() for a in floats)
    assert b"null" not in raw


def test_a_float32_output_is_written_with_the_digits_of_a_float32() -> None:
    raw = encode_reply(Reply("r1", "m", "1", {"y": np.array([[0.1, 1e-5, 3.4e38]], np.float32)}, 0.5))
    assert json.loads(raw)["outputs"]["y"] == [[0.1, 1e-5, 3.4e38]]
    assert decode_reply(raw).outputs["y"].tolist() == np.array([[0.1, 1e-5, 3.4e38]], np.float32).tolist()


def test_requests_decode_alike_with_and_without_orjson() -> None:
    """A device without orjson's wheels (the stdlib alone, ``orjson`` made unimportable in a child process) reads
    the same requests to the same arrays and writes replies that decode to the same values."""
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    payloads = [
        encode_request("j", {"x": x}),
        encode_request("b", {"x": x}, binary=True),
        encode_request("64", {"x": x}, b64=True),
        b'{"request_id": "nan", "inputs": {"x": [[NaN, 1.0]]}}',
    ]
    child = (
        "import sys, json; sys.modules['orjson'] = None\n"
        "from agent.wire import fastjson; assert not fastjson.FAST\n"
        "from agent.wire.inference import decode_request, encode_reply, Reply\n"
        "out = []\n"
        "for p in json.loads(sys.stdin.read()):\n"
        "    r = decode_request(p.encode('latin-1'), 1 << 20)\n"
        "    out.append(encode_reply(Reply(r.request_id, 'm', '1', r.inputs, 0.5), r.binary, r.b64).decode('latin-1'))\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child], input=json.dumps([p.decode("latin-1") for p in payloads]), capture_output=True, text=True, check=True
    )
    for payload, stdlib_reply in zip(payloads, json.loads(done.stdout)):
        req = decode_request(payload, 1 << 20)
        ours = decode_reply(encode_reply(Reply(req.request_id, "m", "1", req.inputs, 0.5), req.binary, req.b64))  # type: ignore[arg-type]
        theirs = decode_reply(stdlib_reply.encode("latin-1"))
        assert ours.request_id == theirs.request_id == req.request_id
        np.testing.assert_array_equal(ours.outputs["x"], theirs.outputs["x"])


@pytest.mark.skipif(not fastjson.FAST, reason="orjson is not installed on this platform: the stdlib writes everything")
def test_a_null_in_the_text_alone_keeps_orjsons_writing() -> None:
    """The stdlib writes a message only where orjson wrote a non-finite float as ``null``: a request id "null" or a
    None (which a client chooses) keep orjson's text, float32 digits and all; a NaN anywhere still goes the stdlib's way."""
    big = np.linspace(0, 1, 100_000, dtype=np.float32)
    for message in ({"id": "null", "data": big}, {"id": None, "data": big, "latency_ms": 1.5}):
        out = fastjson.dumps(message)
        assert out == orjson_dumps(message) and b"0.1" in out
        assert json.loads(out)["id"] == message["id"]
    for nan_at in ({"id": "null", "data": np.array([1.0, np.nan], np.float32)}, {"v": [1.0, [float("-inf")]]}, {"v": np.float64("nan")}):
        assert fastjson.dumps(nan_at) == json.dumps(nan_at, separators=(",", ":"), default=lambda a: a.tolist()).encode()


def orjson_dumps(obj: Any) -> bytes:
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
