"""The Open Inference Protocol's gRPC infer messages: a ``ModelInferRequest`` into the serving path's ``OipRequest``,
the outputs into a ``ModelInferResponse``. Pure protocol, no server (``agent.serve.oip.grpc_server`` calls these).

Tensors come as ``raw_input_contents`` (one bytes entry per input, in input order: what ``tritonclient.grpc`` sends)
or typed ``contents`` (``fp32_contents`` and the like; FP16 only raw, BYTES not served); answers always as
``raw_output_contents``, as Triton answers. The limits are the REST endpoint's (``agent.serve.oip.codec``): at most
64 tensors of ``MAX_DIMS`` dimensions, names of 1..128 characters, ids of 1..64, every size the client claims checked
against the bytes or values that came; the parameters known are ``timeout`` (microseconds), ``priority`` (accepted,
one queue) and ``binary_data_output`` / ``binary_data`` (accepted: gRPC answers are binary anyway).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from agent.serve.oip.codec import KNOWN_PARAMETERS, MAX_NAME, MAX_TENSORS, OIP_DATATYPES, OipRequest
from agent.serve.oip.grpc_messages import messages
from agent.wire.inference import MAX_DIMS, MAX_REQUEST_ID, PayloadError

__all__ = ["decode_infer", "encode_infer", "parse_infer"]

ModelInferRequest = messages["ModelInferRequest"]
ModelInferResponse = messages["ModelInferResponse"]
_DTYPES = {k: np.dtype(v) for k, v in OIP_DATATYPES.items()}
_OIP_OF = {np.dtype(v): k for k, v in OIP_DATATYPES.items()}
# The typed field each datatype's values travel in (FP16 has none: raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_ids = itertools.count(1)


def parse_infer(raw: bytes) -> Any:
    """The wire bytes as a ``ModelInferRequest`` message; ``PayloadError`` when they are not one."""
    try:
        return ModelInferRequest.FromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:  # upb: DecodeError; a message nested past its limit: the same
        raise PayloadError(f"not a ModelInferRequest: {exc}"[:300]) from None


def decode_infer(msg: Any) -> OipRequest:
    """A parsed request's tensors, checked, as the serving path's request."""
    if msg.id and len(msg.id) > MAX_REQUEST_ID:
        raise PayloadError(f"id must be at most {MAX_REQUEST_ID} characters")
    rid = msg.id or f"grpc-{next(_ids)}"
    params = _parameters(msg.parameters, KNOWN_PARAMETERS, "request", rid)
    deadline = params.get("timeout")
    if deadline is not None:
        if isinstance(deadline, bool) or not isinstance(deadline, int) or not 0 < deadline < 3_600_000_000:
            raise PayloadError("timeout must be a positive number of microseconds", rid)
        deadline = deadline / 1e3
    inputs = _inputs(msg, rid)
    if not isinstance(params.get("binary_data_output", False), bool):
        raise PayloadError("binary_data_output must be true or false", rid)
    if len(msg.outputs) > MAX_TENSORS:
        raise PayloadError(f"outputs must be a list of at most {MAX_TENSORS}", rid)
    requested = []
    for out in msg.outputs:
        name = _name(out.name, "an output's name", rid)
        flag = _parameters(out.parameters, frozenset({"binary_data"}), f"output {name!r}", rid).get("binary_data", False)
        if not isinstance(flag, bool):
            raise PayloadError(f"output {name!r}: binary_data must be true or false", rid)
        requested.append(name)
    return OipRequest(rid, inputs, None, deadline, False, False, msg.id or None, requested or None, set(), True)


def _parameters(params: Any, known: frozenset[str], what: str, rid: str) -> dict[str, object]:
    """A parameter map as plain values, refusing names this endpoint does not know (shared memory, sequences)."""
    unknown = sorted(set(params) - known)
    if unknown:
        raise PayloadError(f"unsupported {what} parameters {[u[:40] for u in unknown[:5]]}", rid)
    values = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        values[key] = getattr(value, choice) if choice else None
    return values


def _name(value: str, what: str, rid: str) -> str:
    if not 0 < len(value) <= MAX_NAME:
        raise PayloadError(f"{what} must be a string of 1..{MAX_NAME} characters", rid)
    return value


def _inputs(msg: Any, rid: str) -> dict[str, np.ndarray]:
    tensors, raw = msg.inputs, msg.raw_input_contents
    if not 0 < len(tensors) <= MAX_TENSORS:
        raise PayloadError(f"inputs must be a list of 1..{MAX_TENSORS} tensors", rid)
    if raw and len(raw) != len(tensors):
        raise PayloadError(f"{len(raw)} raw_input_contents for {len(tensors)} inputs (one each, or none)", rid)
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(tensors):
        name = _name(t.name, "an input's name", rid)
        if name in inputs:
            raise PayloadError(f"input {name!r} given twice", rid)
        _parameters(t.parameters, frozenset(), f"input {name!r}", rid)
        shape = tuple(t.shape)
        if len(shape) > MAX_DIMS or not all(0 <= d < 2**31 for d in shape):
            raise PayloadError(f"input {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers", rid)
        dtype = _DTYPES.get(t.datatype)
        if dtype is None:
            raise PayloadError(f"input {name!r}: datatype {t.datatype[:20]!r} is not one of {sorted(OIP_DATATYPES)}", rid)
        has_contents = t.HasField("contents")
        if raw:
            if has_contents:
                raise PayloadError(f"input {name!r}: contents beside raw_input_contents", rid)
            inputs[name] = _from_raw(raw[i], dtype, shape, name, rid)
        else:
            inputs[name] = _from_contents(t.contents, t.datatype, dtype, shape, name, rid)
    return inputs


def _from_raw(data: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], name: str, rid: str) -> np.ndarray:
    need = math.prod(shape) * dtype.itemsize
    if len(data) != need:
        raise PayloadError(f"input {name!r}: {len(data)} raw bytes for shape {list(shape)} ({need} needed)", rid)
    return _shaped(np.frombuffer(data, dtype=dtype), shape, name, rid)


def _shaped(arr: np.ndarray, shape: tuple[int, ...], name: str, rid: str) -> np.ndarray:
    try:
        return arr.reshape(shape)
    except ValueError as exc:  # a zero-size shape whose other dimensions overflow numpy's limit ("array is too big")
        raise PayloadError(f"input {name!r}: shape {list(shape)}: {exc}"[:300], rid) from None


def _from_contents(contents: Any, datatype: str, dtype: np.dtype[Any], shape: tuple[int, ...], name: str, rid: str) -> np.ndarray:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise PayloadError(f"input {name!r}: {datatype} travels in raw_input_contents only", rid)
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise PayloadError(f"input {name!r}: {datatype} values belong in {field}, not {others[0]}", rid)
    values = getattr(contents, field)
    if len(values) != math.prod(shape):
        raise PayloadError(f"input {name!r}: {len(values)} values for shape {list(shape)}", rid)
    wide = np.array(values, dtype=np.int64 if dtype.kind in "iu" and field != "uint64_contents" else None)
    if wide.size == 0:
        wide = np.zeros(0, dtype)
    arr = wide.astype(dtype)
    if dtype.kind in "iu" and not np.array_equal(arr.astype(wide.dtype), wide):
        raise PayloadError(f"input {name!r}: values out of {datatype}'s range", rid)
    return _shaped(arr, shape, name, rid)


def encode_infer(req: OipRequest, model: str, version: str, outputs: dict[str, np.ndarray]) -> bytes:
    """The response: each output (those asked for, in their order, else all) described, its bytes raw. KeyError: an
    output asked for that the model did not give; ValueError: an output dtype the protocol cannot carry."""
    names = req.requested if req.requested is not None else list(outputs)
    response = ModelInferResponse(model_name=model, model_version=version, id=req.oip_id or "")
    raw = response.raw_output_contents
    for name in names:
        arr = np.asarray(outputs[name])
        datatype = _OIP_OF.get(arr.dtype)
        if datatype is None:
            raise ValueError(f"output {name!r} has dtype {arr.dtype.name}, which this endpoint does not send")
        response.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        raw.append(np.ascontiguousarray(arr).tobytes())
    return response.SerializeToString()  # type: ignore[no-any-return]
