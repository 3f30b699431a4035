"""The Open Inference Protocol's REST messages (KServe v2, as Triton speaks it): decode, encode, metadata.

Pure protocol, no HTTP server: ``agent.serve.oip.server`` calls these. A request decodes into the same
``agent.wire.inference.Request`` an MQTT request does (an ``OipRequest``, which adds what the reply needs), so
the serving path after decoding is one. JSON tensors carry ``data`` (flat, row-major, as tritonclient sends it, or
nested); with the binary tensor extension the body is the JSON header (``Inference-Header-Content-Length`` bytes)
followed by the raw tensors in input order, each ``parameters.binary_data_size`` long. Outputs come back as JSON
``data`` or, when asked (``binary_data`` on an output, ``binary_data_output`` for all), as raw bytes after the
JSON, with the response's own ``Inference-Header-Content-Length``.

Limits, as for MQTT (``agent.wire.inference``): the body size is checked before reading it, at most 64 tensors
of ``MAX_DIMS`` dimensions, names of 1..128 characters, ids of 1..64, and every length the client claims (the
header's, each tensor's) checked against the bytes that came; nesting past the JSON decoder's limit is a
``PayloadError``, never a ``RecursionError``.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent import __version__
from agent.runtimes.tensors import TensorSpec
from agent.wire import fastjson
from agent.wire.inference import MAX_DIMS, MAX_REQUEST_ID, PayloadError, Request

__all__ = ["OIP_DATATYPES", "OipRequest", "decode_infer", "encode_infer", "model_metadata", "server_metadata", "tensor_metadata"]

OIP_DATATYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_NUMPY_TO_OIP = {v: k for k, v in OIP_DATATYPES.items()}
_DTYPES = {k: np.dtype(v) for k, v in OIP_DATATYPES.items()}
_OIP_OF = {np.dtype(v): k for k, v in OIP_DATATYPES.items()}  # keyed by dtype: dtype.name costs microseconds a call
_KINDS = {"b": "b", "u": "biu", "i": "biu", "f": "biuf"}  # JSON values each target kind takes (ints for floats; no floats for ints)
MAX_TENSORS = 64
MAX_NAME = 128
_REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_FIELDS = frozenset({"name", "shape", "datatype", "data", "parameters"})
KNOWN_PARAMETERS = frozenset({"binary_data_output", "timeout", "priority"})  # priority: accepted, ignored (one queue)
_ids = itertools.count(1)


# JSON both ways through ``agent.wire.fastjson``, as on the MQTT path: orjson's speed (45 -> 4.5 us for 64 floats) and
# the stdlib's answers where they differ, with or without orjson installed. So a NaN or infinity in an output is written
# ``NaN``/``Infinity``, which tritonclient's parser reads back (orjson alone wrote ``null``, which it cannot).


def _data(arr: np.ndarray) -> Any:
    """An output's flat ``data`` as ``fastjson.dumps`` takes it: the array itself where orjson writes it."""
    return fastjson.tensor(np.ascontiguousarray(arr).reshape(-1))


@dataclass
class OipRequest(Request):
    """A decoded infer request: the tensors (``Request``) plus what its answer needs."""

    oip_id: str | None = None  # the client's "id", echoed in the response
    requested: list[str] | None = None  # output names asked for, in order (None: every output)
    binary_outputs: set[str] = field(default_factory=set)
    binary_all: bool = False


def _str(value: object, what: str, rid: str, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise PayloadError(f"{what} must be a string of 1..{limit} characters", rid)
    return value


def _parameters(value: object, what: str, rid: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 32:
        raise PayloadError(f"{what} parameters must be an object", rid)
    return value


def _load_json(raw: bytes | memoryview) -> Any:
    try:
        return fastjson.loads(raw)
    except UnicodeDecodeError:
        raise PayloadError("the JSON header is not UTF-8") from None
    except RecursionError:  # json's C decoder stops at the recursion limit; a tensor nests at most MAX_DIMS deep
        raise PayloadError("JSON nested too deeply") from None
    except ValueError as exc:  # (past orjson's depth limit the stdlib decides: a RecursionError, above)
        raise PayloadError(f"malformed JSON: {exc}") from None


def decode_infer(body: bytes, header_length: int | None, max_bytes: int) -> OipRequest:
    """An infer request's body (``header_length``: the ``Inference-Header-Content-Length`` header, None without it)."""
    if len(body) > max_bytes:
        raise PayloadError(f"body of {len(body)} bytes is over the {max_bytes}-byte limit")
    if header_length is not None and not 0 < header_length <= len(body):
        raise PayloadError(f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes")
    view = memoryview(body)
    head = _load_json(view[:header_length] if header_length is not None else body)
    binary = view[header_length:] if header_length is not None else view[:0]
    if not isinstance(head, dict):
        raise PayloadError("an infer request is a JSON object")
    oip_id = head.get("id")
    if oip_id is not None:
        oip_id = _str(oip_id, "id", "", MAX_REQUEST_ID)
    rid = oip_id or f"http-{next(_ids)}"
    if not _REQUEST_FIELDS.issuperset(head):
        raise PayloadError(f"unknown fields {sorted(set(head) - _REQUEST_FIELDS)}", rid)
    deadline, binary_all = None, False
    if "parameters" in head:
        params = _parameters(head["parameters"], "request", rid)
        if not KNOWN_PARAMETERS.issuperset(params):
            raise PayloadError(f"unsupported request parameters {sorted(set(params) - KNOWN_PARAMETERS)}", rid)
        deadline = _timeout_ms(params.get("timeout"), rid)
        binary_all = params.get("binary_data_output", False)
        if not isinstance(binary_all, bool):
            raise PayloadError("binary_data_output must be true or false", rid)
    inputs = _inputs(head.get("inputs"), binary, rid)
    requested, binary_outputs = _outputs(head.get("outputs"), rid)
    return OipRequest(rid, inputs, None, deadline, False, False, oip_id, requested, binary_outputs, binary_all)


def _timeout_ms(value: object, rid: str) -> float | None:
    """Triton's ``timeout`` request parameter (microseconds): the request's deadline in the queue."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 3_600_000_000:
        raise PayloadError("timeout must be a positive number of microseconds", rid)
    return value / 1e3


def _inputs(value: object, binary: memoryview, rid: str) -> dict[str, np.ndarray]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_TENSORS:
        raise PayloadError(f"inputs must be a list of 1..{MAX_TENSORS} tensors", rid)
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for t in value:
        if not isinstance(t, dict) or not _INPUT_FIELDS.issuperset(t):
            raise PayloadError("each input is an object of name, shape, datatype, data or parameters", rid)
        name = _str(t.get("name"), "an input's name", rid)
        if name in inputs:
            raise PayloadError(f"input {name!r} given twice", rid)
        shape = t.get("shape")
        if type(shape) is not list or len(shape) > MAX_DIMS or not all(type(d) is int and 0 <= d < 2**31 for d in shape):
            raise PayloadError(f"input {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers", rid)
        datatype = t.get("datatype")
        dtype = _DTYPES.get(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            raise PayloadError(f"input {name!r}: datatype {str(datatype)[:20]!r} is not one of {sorted(OIP_DATATYPES)}", rid)
        size = _parameters(t["parameters"], f"input {name!r}", rid).get("binary_data_size") if "parameters" in t else None
        if size is not None:
            if "data" in t or type(size) is not int or size != math.prod(shape) * dtype.itemsize:
                raise PayloadError(f"input {name!r}: binary_data_size must be the tensor's size in bytes, and no data beside it", rid)
            if offset + size > len(binary):
                raise PayloadError(f"input {name!r}: {size} binary bytes claimed, {len(binary) - offset} left in the body", rid)
            try:
                inputs[name] = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            except ValueError as exc:  # a zero-size shape whose other dimensions overflow numpy's limit
                raise PayloadError(f"input {name!r}: shape {list(shape)}: {exc}"[:300], rid) from None
            offset += size
        else:
            inputs[name] = _json_data(t.get("data"), dtype, tuple(shape), name, rid)
    if offset != len(binary):
        raise PayloadError(f"{len(binary) - offset} binary bytes after the last tensor", rid)
    return inputs


def _json_data(data: object, dtype: np.dtype[Any], shape: tuple[int, ...], name: str, rid: str) -> np.ndarray:
    if not isinstance(data, list):
        raise PayloadError(f"input {name!r}: data must be a list (or binary_data_size given)", rid)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise PayloadError(f"input {name!r}: ragged or non-numeric data", rid) from None
    if arr.size and (arr.dtype.kind not in _KINDS[dtype.kind] or arr.ndim > MAX_DIMS):
        raise PayloadError(f"input {name!r}: data is not {_NUMPY_TO_OIP[dtype.name]} values", rid)
    if arr.size != math.prod(shape):
        raise PayloadError(f"input {name!r}: {arr.size} values for shape {list(shape)}", rid)
    try:
        out = arr.astype(dtype).reshape(shape)
    except (ValueError, OverflowError, TypeError):
        raise PayloadError(f"input {name!r}: values out of {_NUMPY_TO_OIP[dtype.name]}'s range", rid) from None
    if dtype.kind in "iu" and not np.array_equal(out.reshape(-1), arr.reshape(-1)):
        raise PayloadError(f"input {name!r}: values out of {_NUMPY_TO_OIP[dtype.name]}'s range", rid)
    return out


def _outputs(value: object, rid: str) -> tuple[list[str] | None, set[str]]:
    if value is None:
        return None, set()
    if not isinstance(value, list) or len(value) > MAX_TENSORS:
        raise PayloadError(f"outputs must be a list of at most {MAX_TENSORS}", rid)
    names: list[str] = []
    binary: set[str] = set()
    for o in value:
        if not isinstance(o, dict) or set(o) - {"name", "parameters"}:
            raise PayloadError("each requested output is an object of name and parameters", rid)
        name = _str(o.get("name"), "an output's name", rid)
        params = _parameters(o.get("parameters"), f"output {name!r}", rid)
        if set(params) - {"binary_data"}:
            raise PayloadError(f"output {name!r}: unsupported parameters {sorted(set(params) - {'binary_data'})}", rid)
        flag = params.get("binary_data", False)
        if not isinstance(flag, bool):
            raise PayloadError(f"output {name!r}: binary_data must be true or false", rid)
        names.append(name)
        if flag:
            binary.add(name)
    return names, binary


def encode_infer(req: OipRequest, model: str, version: str, outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON header. KeyError: an output the
    request asked for that the model did not give (checked against the model's outputs before serving)."""
    names = req.requested if req.requested is not None else list(outputs)
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in names:
        arr = np.asarray(outputs[name])
        datatype = _OIP_OF.get(arr.dtype)
        if datatype is None:
            raise ValueError(f"output {name!r} has dtype {arr.dtype.name}, which this endpoint does not send")
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if req.binary_all or name in req.binary_outputs:
            raw = np.ascontiguousarray(arr).tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = _data(arr)
        described.append(out)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": described}
    if req.oip_id is not None:
        head["id"] = req.oip_id
    text = fastjson.dumps(head)
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)


def error_body(message: str) -> bytes:
    """An OIP error response: ``{"error": "..."}``."""
    return json.dumps({"error": message[:1000]}).encode()


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """A tensor as the protocol's metadata describes it (REST and gRPC): name, datatype, shape (-1: dynamic)."""
    dtype = spec.accepts  # a quantized tensor is sent and answered as float32
    return {"name": spec.name, "datatype": _NUMPY_TO_OIP.get(dtype.name, dtype.name.upper()), "shape": list(spec.shape)}


def model_metadata(name: str, version: str, platform: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> bytes:
    """``GET /v2/models/{name}``: its one served version, the runtime as the platform, its tensors (-1: dynamic)."""
    return json.dumps(
        {
            "name": name,
            "versions": [version],
            "platform": platform,
            "inputs": [tensor_metadata(s) for s in inputs],
            "outputs": [tensor_metadata(s) for s in outputs],
        }
    ).encode()


def server_metadata() -> bytes:
    """``GET /v2``."""
    return json.dumps({"name": "edgefleet-agent", "version": __version__, "extensions": ["binary_tensor_data"]}).encode()
