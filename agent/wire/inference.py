"""Inference request and reply payloads: JSON (nested lists or base64 tensors) and a compact binary form.

JSON request::

    {"request_id": "r1", "inputs": {"x": [[0.1, 0.2]]}, "reply_to": "...", "deadline_ms": 50}

A tensor is a nested list, or ``{"dtype": "float32", "shape": [1, 2], "b64": "..."}`` (C order); for a model
with one input, ``inputs`` may be the tensor itself. The reply mirrors the request: base64 tensors when any
input was base64, nested lists otherwise::

    {"request_id": "r1", "model": "mlp", "version": "1.0.0", "outputs": {"y": [[...]]}, "latency_ms": 0.4}
    {"request_id": "r1", "error": {"code": "shape_mismatch", "message": "..."}}

Binary (for large tensors; no base64 inflation, no float parsing), request and reply alike::

    b"EFB1" | uint32 big-endian header length | header JSON | tensor bytes, C order, in header order

with the header ``{"request_id", "reply_to"?, "deadline_ms"?, "tensors": [{"name", "dtype", "shape"}]}``
(a reply's header adds ``model``, ``version``, ``latency_ms``, or carries ``error`` and no tensors).
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import EdgefleetError
from agent.wire import fastjson

__all__ = ["BINARY_MAGIC", "DTYPES", "PayloadError", "Reply", "Request", "decode_request", "encode_reply", "encode_request"]

BINARY_MAGIC = b"EFB1"
DTYPES = frozenset({"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"})
MAX_DIMS = 8
_DTYPES_BY_NAME = {name: np.dtype(name) for name in DTYPES}
MAX_REQUEST_ID = 64


class PayloadError(EdgefleetError):
    """A request we cannot read; answered with ``bad_request`` when its ``request_id`` is readable."""

    code = "bad_request"

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass
class Request:
    request_id: str
    inputs: dict[str, np.ndarray] | np.ndarray  # an ndarray: the model's only input, by position
    reply_to: str | None = None
    deadline_ms: float | None = None
    binary: bool = False
    b64: bool = False


@dataclass
class Reply:
    request_id: str
    model: str = ""
    version: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    latency_ms: float = 0.0
    error_code: str = ""
    error_message: str = ""


def _request_id(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REQUEST_ID:
        raise PayloadError(f"request_id must be a string of 1..{MAX_REQUEST_ID} characters")
    return value


def _shape(value: object, rid: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS or not all(isinstance(d, int) and 0 <= d < 2**31 for d in value):
        raise PayloadError(f"shape must be a list of at most {MAX_DIMS} non-negative integers", rid)
    return tuple(value)


def _dtype(value: object, rid: str) -> np.dtype[Any]:
    dtype = _DTYPES_BY_NAME.get(value) if isinstance(value, str) else None  # (np.dtype(str) parses the name each call)
    if dtype is None:
        raise PayloadError(f"dtype must be one of {sorted(DTYPES)}", rid)
    return dtype


def _from_bytes(raw: bytes | memoryview, dtype: np.dtype[Any], shape: tuple[int, ...], rid: str, name: str) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise PayloadError(f"tensor {name!r}: {len(raw)} bytes for shape {list(shape)} {dtype.name} (needs {expected})", rid)
    try:
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    except ValueError as exc:  # a zero-size shape whose other dimensions overflow numpy's limit ("array is too big")
        raise PayloadError(f"tensor {name!r}: shape {list(shape)}: {exc}"[:300], rid) from None


def _json_tensor(value: object, rid: str, name: str) -> tuple[np.ndarray, bool]:
    if isinstance(value, dict):
        if set(value) != {"dtype", "shape", "b64"}:
            raise PayloadError(f"tensor {name!r}: an object needs exactly dtype, shape and b64", rid)
        try:
            raw = base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise PayloadError(f"tensor {name!r}: b64 is not base64", rid) from None
        return _from_bytes(raw, _dtype(value["dtype"], rid), _shape(value["shape"], rid), rid, name), True
    if not isinstance(value, (list, int, float)) or isinstance(value, bool):
        raise PayloadError(f"tensor {name!r}: expected a nested list of numbers or a base64 object", rid)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise PayloadError(f"tensor {name!r}: ragged or non-numeric nested list", rid) from None
    if arr.dtype.kind not in "biuf" or arr.ndim > MAX_DIMS:
        raise PayloadError(f"tensor {name!r}: ragged or non-numeric nested list", rid)
    return arr, False


def decode_request(payload: bytes, max_bytes: int) -> Request:
    """Parse a request; every problem is a ``PayloadError`` naming it (with the request_id when known)."""
    if len(payload) > max_bytes:
        raise PayloadError(f"payload of {len(payload)} bytes is over the {max_bytes}-byte limit", _sniff_request_id(payload))
    if payload[:4] == BINARY_MAGIC:
        return _decode_binary(payload)
    try:
        data = fastjson.loads(payload)
    except UnicodeDecodeError:
        raise PayloadError("payload is neither UTF-8 JSON nor binary (EFB1)") from None
    except ValueError as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None
    except RecursionError:  # json's C decoder stops at the recursion limit; a tensor nests at most MAX_DIMS deep
        raise PayloadError("JSON nested too deeply", _sniff_request_id(payload)) from None
    if not isinstance(data, dict):
        raise PayloadError("a request is a JSON object")
    rid = _request_id(data.get("request_id"))
    unknown = set(data) - {"request_id", "inputs", "reply_to", "deadline_ms"}
    if unknown:
        raise PayloadError(f"unknown fields {sorted(unknown)}", rid)
    reply_to, deadline = _common(data, rid)
    if "inputs" not in data:
        raise PayloadError("missing inputs", rid)
    raw = data["inputs"]
    inputs: dict[str, np.ndarray] | np.ndarray
    if isinstance(raw, dict) and set(raw) != {"dtype", "shape", "b64"}:
        if not raw:
            raise PayloadError("inputs is empty", rid)
        decoded = {str(k): _json_tensor(v, rid, str(k)) for k, v in raw.items()}
        inputs = {k: a for k, (a, _) in decoded.items()}
        b64 = any(b for _, b in decoded.values())
    else:
        inputs, b64 = _json_tensor(raw, rid, "inputs")
    return Request(rid, inputs, reply_to, deadline, binary=False, b64=b64)


def _common(data: dict[str, Any], rid: str) -> tuple[str | None, float | None]:
    reply_to = data.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or len(reply_to) > 256):
        raise PayloadError("reply_to must be a topic string", rid)
    deadline = data.get("deadline_ms")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline < 3.6e6):
        raise PayloadError("deadline_ms must be a positive number of milliseconds", rid)
    return reply_to, float(deadline) if deadline is not None else None


def _decode_binary(payload: bytes) -> Request:
    if len(payload) < 8:
        raise PayloadError("binary payload shorter than its header")
    (hlen,) = struct.unpack(">I", payload[4:8])
    if hlen > len(payload) - 8 or hlen > 65536:
        raise PayloadError("binary header length runs past the payload")
    try:
        header = fastjson.loads(payload[8 : 8 + hlen])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PayloadError("binary header is not JSON") from None
    if not isinstance(header, dict):
        raise PayloadError("binary header is not a JSON object")
    rid = _request_id(header.get("request_id"))
    reply_to, deadline = _common(header, rid)
    tensors = header.get("tensors")
    if not isinstance(tensors, list) or not tensors or len(tensors) > 64:
        raise PayloadError("binary header needs a non-empty tensors list", rid)
    body = memoryview(payload)[8 + hlen :]
    offset, inputs = 0, {}
    for t in tensors:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise PayloadError("each tensor needs a name, dtype and shape", rid)
        dtype, shape = _dtype(t.get("dtype"), rid), _shape(t.get("shape"), rid)
        n = math.prod(shape) * dtype.itemsize
        inputs[t["name"]] = _from_bytes(body[offset : offset + n], dtype, shape, rid, t["name"])
        offset += n
    if offset != len(body):
        raise PayloadError(f"{len(body) - offset} bytes after the last tensor", rid)
    return Request(rid, inputs, reply_to, deadline, binary=True)


def _sniff_request_id(payload: bytes) -> str:
    """The request_id of a payload we will not parse fully (too large), if it is cheap to find."""
    return _sniff_string(payload, b'"request_id"', MAX_REQUEST_ID) or ""


def _sniff_string(payload: bytes, key: bytes, limit: int) -> str | None:
    """A top-level string field found in the first 1 KB without parsing (escapes not followed: a hint only)."""
    head = payload[:1024]
    start = head.find(key)
    if start < 0:
        return None
    rest = head[start + len(key) :].lstrip(b" \t\r\n:")
    if rest[:1] != b'"':
        return None
    end = rest.find(b'"', 1)
    value = rest[1:end].decode("utf-8", "replace") if end > 0 else ""
    return value if 0 < len(value) <= limit and "\\" not in value else None


def _tensor_json(arr: np.ndarray, b64: bool) -> Any:
    if b64:
        arr = np.ascontiguousarray(arr)
        return {"dtype": _dtype_name(arr.dtype), "shape": list(arr.shape), "b64": base64.b64encode(arr.tobytes()).decode()}
    return fastjson.tensor(arr)


_DTYPE_NAMES = {np.dtype(name): name for name in DTYPES}


def _dtype_name(dtype: np.dtype[Any]) -> str:
    """``dtype.name`` by a dict look-up: numpy computes the name in Python on every access (microseconds a reply)."""
    name = _DTYPE_NAMES.get(dtype)
    return name if name is not None else dtype.name


def encode_reply(reply: Reply, binary: bool = False, b64: bool = False) -> bytes:
    head: dict[str, Any] = {"request_id": reply.request_id}
    if reply.error_code:
        head["error"] = {"code": reply.error_code, "message": reply.error_message}
    else:
        head.update(model=reply.model, version=reply.version, latency_ms=round(reply.latency_ms, 4))
    if not binary:
        if not reply.error_code:
            head["outputs"] = {k: _tensor_json(v, b64) for k, v in reply.outputs.items()}
        return fastjson.dumps(head)
    arrays = [np.ascontiguousarray(v) for v in reply.outputs.values()] if not reply.error_code else []
    head["tensors"] = [{"name": k, "dtype": _dtype_name(a.dtype), "shape": list(a.shape)} for k, a in zip(reply.outputs, arrays)]
    h = fastjson.dumps(head)
    return b"".join([BINARY_MAGIC, struct.pack(">I", len(h)), h, *(a.tobytes() for a in arrays)])


def encode_request(
    request_id: str,
    inputs: dict[str, np.ndarray] | np.ndarray,
    binary: bool = False,
    b64: bool = False,
    reply_to: str | None = None,
    deadline_ms: float | None = None,
) -> bytes:
    """What ``agent.client`` sends; also the reference for hand-written clients."""
    head: dict[str, Any] = {"request_id": request_id}
    if reply_to:
        head["reply_to"] = reply_to
    if deadline_ms:
        head["deadline_ms"] = deadline_ms
    if not binary:
        if isinstance(inputs, dict):
            head["inputs"] = {k: _tensor_json(np.asarray(v), b64) for k, v in inputs.items()}
        else:  # the model's only input
            head["inputs"] = _tensor_json(np.asarray(inputs), b64)
        return fastjson.dumps(head)
    if not isinstance(inputs, dict):
        raise ValueError("the binary form names every tensor: pass a dict")
    arrays = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
    head["tensors"] = [{"name": k, "dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays.items()]
    h = fastjson.dumps(head)
    return b"".join([BINARY_MAGIC, struct.pack(">I", len(h)), h, *(a.tobytes() for a in arrays.values())])


def decode_reply(payload: bytes) -> Reply:
    """The client's side of ``encode_reply``; whatever a device answers, a ``PayloadError`` at worst."""
    try:
        return _decode_reply(payload)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, struct.error, binascii.Error) as exc:
        raise PayloadError(f"unreadable reply: {type(exc).__name__}: {str(exc)[:200]}") from None


def peek_request(payload: bytes) -> Request:
    """What an answer needs (request_id, reply_to, binary) without decoding the tensors: paho's thread answers an
    ``overloaded`` request with this, and must never spend 300 ms decoding 4 MB there (nor meet a bomb)."""
    if payload[:4] == BINARY_MAGIC and len(payload) >= 8:
        (hlen,) = struct.unpack(">I", payload[4:8])
        header: Any = None
        if hlen <= 4096:
            try:
                header = fastjson.loads(payload[8 : 8 + hlen])
            except (ValueError, UnicodeDecodeError, RecursionError):
                header = None
        if isinstance(header, dict):
            rid = header.get("request_id")
            reply_to = header.get("reply_to")
            return Request(
                rid if isinstance(rid, str) and len(rid) <= MAX_REQUEST_ID else "",
                np.empty(0),
                reply_to if isinstance(reply_to, str) and len(reply_to) <= 256 else None,
                binary=True,
            )
        return Request("", np.empty(0), binary=True)
    return Request(_sniff_request_id(payload), np.empty(0), _sniff_string(payload, b'"reply_to"', 256))


def _decode_reply(payload: bytes) -> Reply:
    if payload[:4] == BINARY_MAGIC:
        (hlen,) = struct.unpack(">I", payload[4:8])
        head = fastjson.loads(payload[8 : 8 + hlen])
        body, offset, outputs = memoryview(payload)[8 + hlen :], 0, {}
        for t in head.get("tensors", []):
            dtype, shape = np.dtype(t["dtype"]), tuple(t["shape"])
            n = math.prod(shape) * dtype.itemsize
            outputs[t["name"]] = np.frombuffer(body[offset : offset + n], dtype=dtype).reshape(shape)
            offset += n
    else:
        head = fastjson.loads(payload)
        outputs = {}
        for k, v in head.get("outputs", {}).items():
            if isinstance(v, dict):
                outputs[k] = np.frombuffer(base64.b64decode(v["b64"]), dtype=np.dtype(v["dtype"])).reshape(v["shape"])
            else:
                outputs[k] = np.asarray(v, dtype=np.float32)
    err = head.get("error") or {}
    return Reply(
        str(head.get("request_id", "")),
        str(head.get("model", "")),
        str(head.get("version", "")),
        outputs,
        float(head.get("latency_ms", 0.0)),
        str(err.get("code", "")),
        str(err.get("message", "")),
    )
