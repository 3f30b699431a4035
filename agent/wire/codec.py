"""Where hostile input stops: a size cap and a nesting cap before any parser runs, then one typed model.

Python's ``json`` raises ``RecursionError`` (not a ``ValueError``) on deep nesting, and paho
re-raises whatever a callback raises and its network thread dies (DESIGN.md, pitfalls). So
every MQTT payload is measured first: its length, then its bracket depth, computed on the
bytes with strings removed (vectorised, no recursion). Only then is it parsed, and then
validated whole by a pydantic model that refuses unknown fields, non-finite numbers and
values out of bounds. Whatever fails raises ``WireError`` and nothing else.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.errors import EdgefleetError

__all__ = ["MAX_DEPTH", "WireError", "WireModel", "check_shape", "decode", "encode", "load_json"]

MAX_DEPTH = 16  # no message of the protocol nests deeper than 8; 16 leaves room and stops a 4 kB bomb

# A JSON string, unrolled so that it never backtracks: an unterminated one runs to the end (json refuses it
# anyway) instead of being retried from every quote, which made a 128 KB message of escaped quotes cost 100 s.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)', re.S)
_DEPTH_TABLE = bytes(1 if c in b"[{" else 255 if c in b"]}" else 0 for c in range(256))  # 255: -1 as int8


class WireError(EdgefleetError, ValueError):
    """A message that does not follow the protocol; the text says what is wrong (and never echoes it whole)."""

    code = "bad_message"


def nesting_depth(payload: bytes) -> int:
    """The deepest bracket nesting of a JSON text, strings left out; linear time, no recursion."""
    skeleton = _STRING.sub(b"", payload).translate(_DEPTH_TABLE).replace(b"\x00", b"")
    if not skeleton:
        return 0
    return int(np.cumsum(np.frombuffer(skeleton, dtype=np.int8), dtype=np.int64).max())


def check_shape(payload: bytes, max_bytes: int, max_depth: int = MAX_DEPTH) -> None:
    if len(payload) > max_bytes:
        raise WireError(f"message of {len(payload)} bytes is over the {max_bytes}-byte limit")
    if payload.count(b"[") + payload.count(b"{") <= max_depth:
        return  # no deeper than its opening brackets: the scan (half of a telemetry message's decoding) is not needed
    depth = nesting_depth(payload)
    if depth > max_depth:
        raise WireError(f"message nests {depth} deep, over the limit of {max_depth}")


def load_json(payload: bytes, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Caps first, then ``json.loads``; every failure is a ``WireError``.

    The text must be UTF-8 and is decoded before parsing: ``json.loads(bytes)`` would guess UTF-16 or
    UTF-32 and so read brackets the depth scan (on UTF-8 bytes) never saw.
    """
    check_shape(payload, max_bytes, max_depth)
    try:
        return json.loads(payload.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise WireError(f"not JSON: {str(exc)[:120]}") from None


class WireModel(BaseModel):
    """One message of the protocol: unknown fields refused, numbers finite, every field bounded by its type."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, str_max_length=4096)
    MAX_BYTES: ClassVar[int] = 64 * 1024  # the size cap of this message, checked before parsing


M = TypeVar("M", bound=WireModel)


def decode(model: type[M], payload: bytes, max_bytes: int | None = None) -> M:
    """Bytes from a peer → one validated message, or ``WireError`` saying which field is wrong."""
    check_shape(payload, max_bytes or _max_bytes(model))
    try:
        # pydantic parses and validates in one pass (no Python dicts in between: a third of the ingest's decoding)
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise WireError(f"not JSON: {first['msg'][:120]}") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise WireError(f"{model.__name__}: expected a JSON object") from None
        where = ".".join(str(p) for p in first["loc"]) or model.__name__
        raise WireError(f"{model.__name__}: {where}: {first['msg']} ({exc.error_count()} error(s))") from None
    except RecursionError:  # pydantic's own recursion on a pathological object that slipped under the depth cap
        raise WireError(f"{model.__name__}: nested too deeply") from None


def encode(message: WireModel) -> bytes:
    """The canonical form: compact JSON, fields that are None left out (every other field, defaults too, on the wire)."""
    return message.model_dump_json(exclude_none=True).encode()


def _max_bytes(model: type[WireModel]) -> int:
    return int(getattr(model, "MAX_BYTES", 64 * 1024))
