"""Tensors as runtimes see them: their description, the checks every input passes, and int8 (de)quantization.

Why one module: input validation and quantization must behave identically on every
backend, so a backend file only runs arrays that already passed here. A tensor's
shape uses -1 for a dynamic dimension; its batch axis is where requests stack when the
agent micro-batches them (None: it has none, a 0-d sample rate say).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from agent.errors import DtypeMismatch, EmptyInput, MissingInput, NonFiniteInput, ShapeMismatch, UnknownInput

__all__ = [
    "ZEROS_UP_TO",
    "TensorSpec",
    "all_finite",
    "inferred_batch_axis",
    "named_inputs",
    "validate_inputs",
    "with_batch_axes",
    "quantize",
    "dequantize",
]


@dataclass(frozen=True, eq=True)
class TensorSpec:
    """One input or output tensor. ``shape`` uses -1 for a dynamic dimension.

    ``quantization`` is (scale, zero_point) for affine-quantized tensors: callers send
    and receive floats for those, the runtime converts. ``batch_axis``: the dimension
    along which requests stack (None: no batch dimension; ``Runtime.load`` sets it from
    the bundle, ``--batch-axis`` or ``inferred_batch_axis``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    quantization: tuple[float, int] | None = None
    batch_axis: int | None = None

    @property
    def is_static(self) -> bool:
        return all(d >= 0 for d in self.shape)

    @cached_property
    def accepts(self) -> np.dtype[Any]:
        """The dtype callers send: float32 for a quantized tensor, else the tensor's own."""
        return np.dtype(np.float32) if self.quantization is not None else self.dtype

    @cached_property
    def ndim(self) -> int:
        return len(self.shape)

    @cached_property
    def static_dims(self) -> tuple[tuple[int, int], ...]:
        return tuple((i, d) for i, d in enumerate(self.shape) if d >= 0)

    @cached_property
    def floating(self) -> bool:
        """Callers send floats: their values are checked for NaN and infinity."""
        return self.accepts.kind == "f"

    @cached_property
    def _fitting(self) -> dict[tuple[int, ...], bool]:
        return {}

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Does an array of ``shape`` fit this tensor (rank and static dims)? Remembered for the last shapes asked
        about, so a dynamic tensor's check is one dict lookup per call, not a loop over its dims."""
        known = self._fitting.get(shape)
        if known is not None:
            return known
        ok = len(shape) == self.ndim and all(shape[i] == d for i, d in self.static_dims)
        if len(self._fitting) >= 64:  # a stream of ever-new batch sizes: forget, do not grow
            self._fitting.clear()
        self._fitting[shape] = ok
        return ok

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "quantization": list(self.quantization) if self.quantization else None,
            "batch_axis": self.batch_axis,
        }


def inferred_batch_axis(shape: tuple[int, ...]) -> int | None:
    """The batch axis of a tensor nobody named one for. A 0-d tensor has none. A first dimension fixed above 1 with
    exactly one dynamic dimension elsewhere is a recurrent state (``[layers, batch, hidden]``): the dynamic one.
    Everything else stacks on dimension 0, as most models do."""
    if not shape:
        return None
    dynamic = [i for i, d in enumerate(shape) if d < 0]
    if shape[0] > 1 and len(dynamic) == 1:
        return dynamic[0]
    return 0


def with_batch_axes(specs: tuple[TensorSpec, ...], named: Mapping[str, int | None]) -> tuple[TensorSpec, ...]:
    """``specs`` with their batch axes: the one ``named`` gives a tensor (the bundle's signature, ``--batch-axis``) when it
    fits the tensor's rank, else the inferred one. Names not in ``specs`` are left to the caller to report."""
    out = []
    for s in specs:
        axis = named[s.name] if s.name in named else inferred_batch_axis(s.shape)
        if axis is not None and not 0 <= axis < s.ndim:  # a signature's axis that does not fit this file's tensor
            axis = inferred_batch_axis(s.shape)
        out.append(replace(s, batch_axis=axis))
    return tuple(out)


def named_inputs(specs: tuple[TensorSpec, ...], inputs: Mapping[str, object] | np.ndarray) -> Mapping[str, object]:
    """A request by name: one array alone is the model's only input; a model with several needs them by name."""
    if isinstance(inputs, np.ndarray):
        if len(specs) != 1:
            raise MissingInput(f"the model has inputs {[s.name for s in specs]}: give them by name (.npz or a JSON object)")
        return {specs[0].name: inputs}
    return inputs


def _validate_array(spec: TensorSpec, value: object) -> np.ndarray:
    # Fast path: the array already has the dtype the runtime takes and is contiguous,
    # which is what the agent's own decoder produces. Only shape, size and finiteness
    # are left to check, each in O(1) Python operations (the finiteness check is one BLAS call).
    if type(value) is np.ndarray and ((dt := value.dtype) is spec.accepts or dt == spec.accepts) and value.flags.c_contiguous:
        arr = value  # (a builtin dtype is one object: ``is`` saves the comparison's conversion machinery)
    else:
        arr = as_accepted(spec, value)
    shape = arr.shape
    if shape != spec.shape and not (spec._fitting.get(shape) or spec.fits(shape)):
        want = "x".join("?" if d < 0 else str(d) for d in spec.shape)
        raise ShapeMismatch(f"input '{spec.name}': expected shape [{want}], got {list(shape)}")
    if arr.size == 0:
        raise EmptyInput(f"input '{spec.name}': empty array of shape {shape}")
    if spec.floating and not all_finite(arr):
        raise NonFiniteInput(f"input '{spec.name}': contains NaN or infinity")
    return arr


# The finiteness checks' dot product sets numpy's "invalid" flag for an input holding NaN or infinity; that input is
# refused (NonFiniteInput, logged and counted where it is served), so numpy's warning about it says nothing more and
# is not shown. A filter costs the valid calls nothing: Python reads the filters only when a warning is raised.
warnings.filterwarnings("ignore", message="invalid value encountered in dot", category=RuntimeWarning, module=r"agent\.runtimes\.")

_SMALL = 64  # up to this many elements a Python sum beats any numpy call
ZEROS_UP_TO = 4096  # elements: beyond this the dot product with itself (and errstate's ~1 us) is cheap beside the data
_zeros: dict[tuple[int, np.dtype[Any]], np.ndarray] = {}


def all_finite(arr: np.ndarray) -> bool:
    """NaN or infinity anywhere makes the sum (small arrays) or a dot product non-finite.

    Why not ``isfinite(...).all()``: numpy's reduction and errstate machinery has a
    code and data footprint that evicts the runtime's own from the CPU caches, and
    the next inference call pays several microseconds for it (measured: a tiny ONNX
    model went from 8 to 14 us per call); ``errstate`` alone costs ~1 us a call. Small
    arrays are summed in plain Python. Mid-sized ones take one BLAS dot with zeros:
    0 for any finite array, NaN for NaN or infinity, and it cannot overflow, so no
    floating-point flag is raised for a valid input and no errstate is needed (an
    infinity raises "invalid": numpy warns, once per process under the default warning
    filters, or raises the RuntimeWarning when warnings are errors; the input is refused
    either way — an errstate to silence it would cost every valid call its microsecond).
    Large ones take the dot with themselves under errstate. A sum or dot that overflows
    gets the exact check.
    """
    flat = arr.ravel()
    n = flat.size
    if n <= _SMALL:
        return math.isfinite(sum(flat.tolist())) or bool(np.isfinite(arr).all())
    if n <= ZEROS_UP_TO:
        key = (n, flat.dtype)
        zeros = _zeros.get(key)
        if zeros is None:
            if len(_zeros) >= 32:  # ever-new sizes (dynamic batches): forget, do not grow
                _zeros.clear()
            zeros = _zeros.setdefault(key, np.zeros(n, flat.dtype))
        try:
            return not flat.dot(zeros)  # 0 is falsy, NaN is not
        except (RuntimeWarning, FloatingPointError):  # warnings (or np.seterr) turned into errors: an infinity met a zero
            return False
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(flat.dot(flat))
    return math.isfinite(total) or bool(np.isfinite(arr).all())


def as_accepted(spec: TensorSpec, value: object) -> np.ndarray:
    """``value`` as a C-contiguous array of the dtype the runtime takes for ``spec`` (a copy when it was not one);
    DtypeMismatch where that would lose values."""
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:  # ragged lists and the like
            raise DtypeMismatch(f"input '{spec.name}': not a rectangular numeric array ({exc})") from exc
    kind = arr.dtype.kind
    if kind not in "biuf":
        raise DtypeMismatch(f"input '{spec.name}': expected numbers ({spec.dtype.name}), got {arr.dtype}")
    target = spec.accepts if kind == "f" else spec.dtype
    if arr.dtype != target:
        tkind = target.kind
        if tkind == "f" or (tkind in "iu" and kind in "biu" and _fits(arr, target)) or (tkind == "b" and kind == "b"):
            with np.errstate(over="ignore"):  # 1e300 -> float32 is inf, which the finiteness check then refuses
                arr = arr.astype(target)
        else:
            raise DtypeMismatch(f"input '{spec.name}': expected {target.name}, got {arr.dtype} (would lose values)")
    return np.ascontiguousarray(arr)


def _fits(arr: np.ndarray, target: np.dtype[Any]) -> bool:
    if np.can_cast(arr.dtype, target, "safe"):
        return True
    info = np.iinfo(target)
    return arr.size == 0 or (int(arr.min()) >= info.min and int(arr.max()) <= info.max)


_MISSING = object()


def validate_inputs(specs: tuple[TensorSpec, ...], inputs: Mapping[str, object]) -> list[np.ndarray]:
    """Arrays in the model's input order, converted to what the runtime takes; typed error otherwise."""
    if type(inputs) is dict and len(specs) == 1 and len(inputs) == 1:  # the common request: one array, in a plain dict
        spec = specs[0]
        value = inputs.get(spec.name, _MISSING)
        if value is not _MISSING:
            return [_validate_array(spec, value)]
    if not isinstance(inputs, Mapping):
        raise UnknownInput(f"inputs must be a mapping of tensor name to array, got {type(inputs).__name__}")
    if len(inputs) == len(specs):
        arrays = []
        for spec in specs:
            value = inputs.get(spec.name, _MISSING)
            if value is _MISSING:
                break
            arrays.append(_validate_array(spec, value))
        else:
            return arrays
    names = [s.name for s in specs]
    unknown = sorted(str(k) for k in inputs if k not in names)
    if unknown:
        raise UnknownInput(f"unknown input {unknown[0]!r}; the model's inputs are {names}")
    missing = [n for n in names if n not in inputs]
    raise MissingInput(f"missing input {missing[0]!r}; the model's inputs are {names}")


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float -> the tensor's integer type with its (scale, zero_point); raw integers pass through."""
    if spec.quantization is None or x.dtype == spec.dtype:
        return x
    scale, zero_point = spec.quantization
    info = np.iinfo(spec.dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.quantization is None:
        return q
    scale, zero_point = spec.quantization
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)
