"""Micro-batching's arithmetic: merging requests into one call along each tensor's own batch axis, splitting the answer.

Why apart from the serving loop: which requests may share a call is a question of tensors, not of queues. Each input
stacks along its own batch axis (0 for most, 1 for a recurrent state ``[layers, batch, hidden]``); an input without one
(a 0-d sample rate) goes into the call once, so it must be equal in every request merged. Anything else — names that
differ, other dimensions that differ, a request whose inputs disagree on its row count, a request of no rows, a batch
axis the model fixes (two halves of a static batch of 4, each refused alone, would pass merged) — is not merged: those
requests run one by one, which is always correct. Likewise an output is cut into rows only along a dynamic batch axis:
a fixed-size output whose size happens to equal the merged row count is not per row.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from agent.runtimes.tensors import TensorSpec

__all__ = ["merge", "request_rows", "split"]


def request_rows(specs: Mapping[str, TensorSpec], inputs: Mapping[str, np.ndarray]) -> int | None:
    """The request's batch size: the same along every batched input's axis; None when they disagree, an input is unknown,
    a batch axis is static in the model, none has a batch axis or the request has no rows (alone it is refused as empty)."""
    rows = set()
    for name, arr in inputs.items():
        spec = specs.get(name)
        if spec is None or arr.ndim != spec.ndim:
            return None
        if spec.batch_axis is not None:
            if spec.shape[spec.batch_axis] >= 0:
                return None
            rows.add(arr.shape[spec.batch_axis])
    return rows.pop() if len(rows) == 1 and 0 not in rows else None


def _same_but_axis(a: np.ndarray, b: np.ndarray, spec: TensorSpec) -> bool:
    if a.ndim != b.ndim or not (a.dtype == b.dtype or _both_become_float(a, b, spec)):
        return False
    axis = spec.batch_axis
    if axis is None:
        return a.shape == b.shape and bool(np.array_equal(a, b))
    return a.shape[:axis] == b.shape[:axis] and a.shape[axis + 1 :] == b.shape[axis + 1 :]


def _both_become_float(a: np.ndarray, b: np.ndarray, spec: TensorSpec) -> bool:
    """Numbers in two dtypes for a float input that is not quantized: each request alone would be converted to the model's
    dtype (JSON floats decode as float64, whole numbers as int64, a binary request is float32), so they may share a
    call; joined, numpy's common dtype keeps each value as sent (integers exactly up to 2**53), and the model host
    converts the merged call. A quantized input takes integers as already quantized and floats to quantize: not mixed."""
    return spec.quantization is None and spec.dtype.kind == "f" and a.dtype.kind in "biuf" and b.dtype.kind in "biuf"


def merge(specs: Mapping[str, TensorSpec], requests: list[Mapping[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[int]] | None:
    """One call's inputs for ``requests`` and each request's row count, or None when they cannot share a call."""
    first = requests[0]
    rows = []
    for inputs in requests:
        n = request_rows(specs, inputs)
        if n is None or inputs.keys() != first.keys():
            return None
        if any(not _same_but_axis(arr, first[k], specs[k]) for k, arr in inputs.items()):
            return None
        rows.append(n)
    joined = {}
    for name, arr in first.items():
        axis = specs[name].batch_axis
        joined[name] = arr if axis is None else np.concatenate([r[name] for r in requests], axis=axis)
    return joined, rows


def split(specs: Mapping[str, TensorSpec], outputs: Mapping[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Each request's share of a merged call's outputs; ValueError when an output is not per row along its batch axis
    (it has none, it is static there, or its size there is not the merged row count)."""
    total = sum(rows)
    parts: list[dict[str, np.ndarray]] = [{} for _ in rows]
    for name, value in outputs.items():
        spec = specs.get(name)
        axis = spec.batch_axis if spec is not None else None
        if spec is None or axis is None or axis >= spec.ndim or spec.shape[axis] >= 0 or value.ndim <= axis or value.shape[axis] != total:
            raise ValueError(f"output {name!r} is not per row")
        start = 0
        for part, n in zip(parts, rows):
            part[name] = value[(slice(None),) * axis + (slice(start, start + n),)]
            start += n
    return parts
