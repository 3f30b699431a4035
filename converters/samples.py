"""Sample inputs for calibration and parity: the user's, or deterministic synthetic ones, and how they stack.

Why each input has its own batch axis: published models do not all stack samples on
dim 0 — a recurrent state ``[layers, batch, hidden]`` stacks them on dim 1, and a 0-d
scalar (a sample rate) has no batch dimension at all: it is the same for every
sample, and an .npz holds it as a 0-d array. The axis comes from ``--batch-axis
NAME=K`` or is inferred from the samples (the one dynamic dimension whose size is
the sample count), and travels into ``bundle.json`` as ``TensorSignature.batch_axis``.
Every slice, batch and concatenation of samples and answers goes through the helpers
here, so no other module assumes dim 0.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from agent.bundle import TensorSignature
from converters.errors import SamplesError

__all__ = ["batches", "concat", "count", "load", "output_axes", "resolve_axes", "synthetic", "take"]

SYNTHETIC_COUNT = 32
MAX_SAMPLES_BYTES = 1 << 30
Arrays = dict[str, np.ndarray]


def _candidates(t: TensorSignature) -> list[int]:
    """Dimensions that can stack samples: the dynamic ones, and dim 0 when it is 1 (a static batch of one)."""
    return [i for i, d in enumerate(t.shape) if d < 0 or (i == 0 and d == 1)]


def _check_given(inputs: list[TensorSignature], given: Mapping[str, int | None]) -> None:
    by_name = {t.name: t for t in inputs}
    for name, axis in given.items():
        t = by_name.get(name)
        if t is None:
            raise SamplesError(f"--batch-axis names {name!r}; the model's inputs are {list(by_name)}")
        if axis is not None and not 0 <= axis < len(t.shape):
            raise SamplesError(f"--batch-axis {name}={axis}: the input has {len(t.shape)} dimensions {t.shape}")


def resolve_axes(
    inputs: list[TensorSignature], data: Arrays | None = None, given: Mapping[str, int | None] | None = None
) -> list[TensorSignature]:
    """The inputs with their batch axes: given, None for 0-d, else inferred from ``data`` (or the signature alone)."""
    given = dict(given or {})
    _check_given(inputs, given)
    axes: dict[str, int | None] = {t.name: given[t.name] if t.name in given else None for t in inputs if t.name in given or not t.shape}
    rest = [t for t in inputs if t.name not in axes]
    if data is None or not rest:
        axes |= {t.name: (_candidates(t) or [None])[0] for t in rest}  # type: ignore[list-item]
    else:
        axes |= _infer(rest, data, {data[n].shape[a] for n, a in axes.items() if a is not None and n in data and data[n].ndim > a})
    return [t.model_copy(update={"batch_axis": axes[t.name]}) for t in inputs]


def _infer(rest: list[TensorSignature], data: Arrays, known: set[int]) -> dict[str, int | None]:
    """Dim 0 when every input stacks there with one count (the common case); else the one dynamic dimension of the count."""
    for t in rest:
        if data[t.name].ndim != len(t.shape):
            raise SamplesError(f"samples for {t.name!r} have shape {list(data[t.name].shape)}; the input is {t.shape}")
    cands = {t.name: _candidates(t) for t in rest}
    if all(c[:1] == [0] for c in cands.values()) and len({data[t.name].shape[0] for t in rest} | known) == 1:
        return {t.name: 0 for t in rest}
    sizes = set.intersection(*[{data[t.name].shape[i] for i in cands[t.name]} for t in rest if cands[t.name]] or [set()])
    if known:
        sizes &= known
    if len(sizes) != 1 and all(c[:1] == [0] for c in cands.values()):
        raise SamplesError(f"inputs have different sample counts: {sorted({data[t.name].shape[0] for t in rest} | known)}")
    if len(sizes) != 1:
        names = ", ".join(f"{t.name} {list(data[t.name].shape)}" for t in rest)
        raise SamplesError(f"cannot tell which dimension stacks the samples ({names}): give --batch-axis NAME=K per input")
    n = sizes.pop()
    axes: dict[str, int | None] = {}
    for t in rest:
        dims = [i for i in cands[t.name] if data[t.name].shape[i] == n]
        if len(dims) > 1 and 0 not in dims:
            shape = list(data[t.name].shape)
            raise SamplesError(f"samples for {t.name!r} {shape}: dims {dims} all have the sample count; give --batch-axis")
        axes[t.name] = (0 if 0 in dims else dims[0]) if dims else None
    return axes


def synthetic(inputs: list[TensorSignature], count: int = SYNTHETIC_COUNT, seed: int = 0) -> Arrays:
    """Deterministic inputs from the signature (with batch axes): floats uniform in [-1, 1], integers in [0, 10)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in inputs:
        shape = list(t.shape)
        if t.batch_axis is not None:
            shape[t.batch_axis] = count
        if any(d < 0 for d in shape):
            raise SamplesError(f"input {t.name!r} has dynamic dims {t.shape}: synthetic samples need --samples with real data")
        dtype = np.dtype(np.float32) if t.quantization is not None else np.dtype(t.dtype)  # a quantized model takes floats
        if dtype.kind == "f":
            out[t.name] = rng.uniform(-1.0, 1.0, shape).astype(dtype)
        elif dtype.kind == "b":
            out[t.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            out[t.name] = rng.integers(0, 10, shape).astype(dtype)
    return out


def _read(path: Path, inputs: list[TensorSignature]) -> Arrays:
    try:
        if path.stat().st_size > MAX_SAMPLES_BYTES:
            raise SamplesError(f"{path.name} is larger than {MAX_SAMPLES_BYTES} bytes")
        if path.suffix == ".npy":
            if len(inputs) != 1:
                raise SamplesError(f"the model has inputs {[t.name for t in inputs]}: give samples as .npz named per input")
            return {inputs[0].name: np.load(path, allow_pickle=False)}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        raise SamplesError(f"samples must be .npy or .npz, not {path.name}")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SamplesError(f"cannot read samples {path.name}: {exc}") from exc


def load(path: Path, inputs: list[TensorSignature], given: Mapping[str, int | None] | None = None) -> tuple[Arrays, list[TensorSignature]]:
    """The samples (``.npy`` for a one-input model, ``.npz`` named per input) and the inputs with their batch axes."""
    data = _read(path, inputs)
    names = [t.name for t in inputs]
    if sorted(data) != sorted(names):
        raise SamplesError(f"samples name {sorted(data)}, the model's inputs are {names}")
    for t in inputs:
        if data[t.name].dtype.kind not in "biuf":
            raise SamplesError(f"samples for {t.name!r} are {data[t.name].dtype}, not numbers")
        if not t.shape and data[t.name].ndim != 0:
            raise SamplesError(f"samples for {t.name!r} have shape {list(data[t.name].shape)}: the input is 0-d, the same for every sample")
    inputs = resolve_axes(inputs, data, given)
    counts = set()
    for t in inputs:
        data[t.name] = _checked(t, data[t.name])
        if t.batch_axis is not None:
            counts.add(data[t.name].shape[t.batch_axis])
    if len(counts) > 1:
        raise SamplesError(f"inputs have different sample counts: {sorted(counts)}")
    return data, inputs


def _checked(t: TensorSignature, arr: np.ndarray) -> np.ndarray:
    """One input's samples against its signature: rank, static dims off the batch axis, not empty, finite; its dtype."""
    off_axis = [(i, d) for i, d in enumerate(t.shape) if i != t.batch_axis and d >= 0]
    if arr.ndim != len(t.shape) or any(arr.shape[i] != d for i, d in off_axis):
        where = f"stacked on dim {t.batch_axis}" if t.batch_axis is not None else "no batch dimension"
        raise SamplesError(f"samples for {t.name!r} have shape {list(arr.shape)}; the input is {t.shape} ({where})")
    if arr.size == 0:
        raise SamplesError(f"samples for {t.name!r} are empty")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise SamplesError(f"samples for {t.name!r} contain NaN or infinity")
    want = np.dtype(np.float32) if t.quantization else np.dtype(t.dtype)
    return arr.astype(want) if arr.dtype != want else arr


def count(data: Arrays, inputs: list[TensorSignature]) -> int:
    """How many samples ``data`` holds: the size of any input's batch axis (1 when no input has one)."""
    for t in inputs:
        if t.batch_axis is not None:
            return int(data[t.name].shape[t.batch_axis])
    return 1


def take(data: Arrays, tensors: list[TensorSignature], start: int, stop: int) -> Arrays:
    """Samples ``start:stop`` of each tensor along its batch axis; tensors without one pass whole."""
    axes = {t.name: t.batch_axis for t in tensors}
    out = {}
    for k, v in data.items():
        axis = axes.get(k, 0)
        out[k] = v if axis is None else np.take(v, np.arange(start, min(stop, v.shape[axis])), axis=axis)
    return out


def batches(data: Arrays, inputs: list[TensorSignature], size: int) -> list[Arrays]:
    """``data`` cut into runs of ``size`` samples along each input's batch axis."""
    n = count(data, inputs)
    return [take(data, inputs, i, i + size) for i in range(0, n, size)]


def concat(parts: list[Arrays], outputs: list[TensorSignature]) -> Arrays:
    """Answers of several runs joined along each output's batch axis (an output without one is the first run's)."""
    axes = {t.name: t.batch_axis for t in outputs}
    return {k: parts[0][k] if axes.get(k, 0) is None else np.concatenate([p[k] for p in parts], axis=axes.get(k, 0)) for k in parts[0]}


def output_axes(outputs: list[TensorSignature], answers: Arrays, inputs: list[TensorSignature], batch: int) -> list[TensorSignature]:
    """Each output's batch axis, from one run of ``batch`` samples: the axis an input of its rank stacks on, else dim 0,
    else the first dimension of that size; None when no dimension has it (a per-model constant)."""
    by_rank = {len(t.shape): t.batch_axis for t in inputs if t.batch_axis is not None}
    result = []
    for t in outputs:
        shape = answers[t.name].shape
        same = by_rank.get(len(shape))
        dims = [i for i, d in enumerate(shape) if d == batch]
        axis = same if same is not None and same in dims else (0 if 0 in dims else (dims[0] if dims else None))
        sig = t.shape if len(t.shape) == len(shape) else [-1] * len(shape)  # a dynamic-rank output takes the rank it answered with
        result.append(t.model_copy(update={"batch_axis": axis, "shape": sig}))
    return result
