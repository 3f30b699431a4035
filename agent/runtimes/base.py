"""The one interface every inference runtime implements, and the checks they share.

Why a template: input validation, error typing, locking and quantization are the
same for every backend and must behave identically, so they live here once; a
backend file only says how to load a file and run already-validated arrays.
Runtimes know tensors, not models: no pre- or post-processing lives here.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.errors import (
    DtypeMismatch,
    EdgefleetError,
    EmptyInput,
    InferenceError,
    InvalidOptions,
    MissingInput,
    ModelLoadError,
    NonFiniteInput,
    RuntimeClosed,
    RuntimeUnavailable,
    ShapeMismatch,
    UnknownInput,
    UnsupportedModelFormat,
)

__all__ = [
    "Runtime",
    "RuntimeOptions",
    "ProbeResult",
    "TensorSpec",
    "ModelDescription",
    "model_format",
    "MODEL_FORMATS",
]

MODEL_FORMATS = ("tflite", "openvino", "onnx")

_REGISTRY: dict[str, type[Runtime]] = {}


class RuntimeOptions(BaseModel):
    """Base of each runtime's own options; unknown keys are refused so typos surface."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class ProbeResult:
    """What a runtime can offer on this machine, found without loading a model."""

    name: str
    available: bool
    version: str | None = None
    devices: tuple[str, ...] = ()
    reason: str = ""  # why it is unavailable, or notes

    def has_device(self, device: str) -> bool:
        family = device.split(".")[0].upper()
        return any(d.upper() == device.upper() or d.split(".")[0].upper() == family for d in self.devices)


@dataclass(frozen=True, eq=True)
class TensorSpec:
    """One input or output tensor. ``shape`` uses -1 for a dynamic dimension.

    ``quantization`` is (scale, zero_point) for affine-quantized tensors: callers send
    and receive floats for those, the runtime converts.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    quantization: tuple[float, int] | None = None

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

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "quantization": list(self.quantization) if self.quantization else None,
        }


@dataclass(frozen=True)
class ModelDescription:
    runtime: str
    runtime_version: str
    device: str  # the device actually used, e.g. "CPU", "NPU", "CUDAExecutionProvider"
    path: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "runtime_version": self.runtime_version,
            "device": self.device,
            "path": self.path,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "details": self.details,
        }


def model_format(path: Path) -> str:
    """The model's format from its content where it has a magic number, else its suffix."""
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if head[4:8] == b"TFL3" or suffix == ".tflite":
        return "tflite"
    if suffix == ".xml":
        return "openvino"
    if suffix == ".onnx":
        return "onnx"
    raise UnsupportedModelFormat(f"{path.name}: unknown model format (expected .tflite, .onnx or OpenVINO .xml)")


def _validate_array(spec: TensorSpec, value: object) -> np.ndarray:
    # Fast path: the array already has the dtype the runtime takes and is contiguous,
    # which is what the agent's own decoder produces. Only shape, size and finiteness
    # are left to check.
    if type(value) is np.ndarray and value.dtype == spec.accepts and value.flags.c_contiguous:
        arr = value
    else:
        arr = _convert(spec, value)
    if arr.ndim != spec.ndim or any(arr.shape[i] != d for i, d in spec.static_dims):
        want = "x".join("?" if d < 0 else str(d) for d in spec.shape)
        raise ShapeMismatch(f"input '{spec.name}': expected shape [{want}], got {list(arr.shape)}")
    if arr.size == 0:
        raise EmptyInput(f"input '{spec.name}': empty array of shape {arr.shape}")
    if arr.dtype.kind == "f" and not _all_finite(arr):
        raise NonFiniteInput(f"input '{spec.name}': contains NaN or infinity")
    return arr


_SMALL = 64  # up to this many elements a Python sum beats any numpy call


def _all_finite(arr: np.ndarray) -> bool:
    """NaN or infinity anywhere makes the sum (small arrays) or the dot product non-finite.

    Why not ``isfinite(...).all()``: numpy's reduction and errstate machinery has a
    code and data footprint that evicts the runtime's own from the CPU caches, and
    the next inference call pays several microseconds for it (measured: a tiny ONNX
    model went from 8 to 14 us per call). Small arrays are summed in plain Python;
    larger ones take one BLAS dot (no temporaries; it reports overflow as a warning,
    hence errstate). A finite array whose sum or dot overflows gets the exact check.
    """
    flat = arr.reshape(-1)
    if flat.size <= _SMALL:
        total = sum(flat.tolist())
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(flat.dot(flat))
    return math.isfinite(total) or bool(np.isfinite(arr).all())


def _convert(spec: TensorSpec, value: object) -> np.ndarray:
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


class Runtime(ABC):
    """One loaded model on one runtime and device.

    Lifecycle: ``probe()`` (class level, no model) -> ``load()`` -> ``warmup()`` ->
    ``infer()`` any number of times, from any thread -> ``close()``.
    """

    name: ClassVar[str]
    formats: ClassVar[frozenset[str]]  # the MODEL_FORMATS this runtime reads
    Options: ClassVar[type[RuntimeOptions]] = RuntimeOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _REGISTRY[cls.name] = cls

    def __init__(self) -> None:
        self._lock = threading.Lock()  # backends' interpreters and infer requests are not thread-safe
        self._loaded = False
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._output_names: tuple[str, ...] = ()
        self._device = ""
        self._path = ""
        self._details: dict[str, Any] = {}

    # -- implemented by each backend ----------------------------------------

    @classmethod
    @abstractmethod
    def probe(cls) -> ProbeResult:
        """Is the runtime importable, which version, which devices — without loading a model."""

    @abstractmethod
    def _load(self, path: Path, fmt: str, device: str | None, options: Any) -> None:
        """Load the model; set ``_inputs``, ``_outputs`` and ``_device``. Raise ModelLoadError on failure."""

    @abstractmethod
    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Run validated arrays (model input order); return outputs in model output order."""

    def _close(self) -> None:
        """Release the backend's resources."""

    @classmethod
    def version(cls) -> str:
        return cls.probe().version or "unknown"

    # -- the shared template ------------------------------------------------

    def load(self, path: str | Path, device: str | None = None, options: Mapping[str, Any] | RuntimeOptions | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        fmt = model_format(path)
        if fmt not in self.formats:
            raise UnsupportedModelFormat(f"{self.name} cannot read {fmt} models ({path.name})")
        opts = self.parse_options(options)
        probe = self.probe()
        if not probe.available:
            raise RuntimeUnavailable(f"{self.name} is not available here: {probe.reason}")
        try:
            self._load(path, fmt, device, opts)
        except EdgefleetError:
            raise
        except Exception as exc:  # a backend's own exception types: give them ours, keep the message
            raise ModelLoadError(f"{self.name} could not load {path.name}: {_one_line(exc)}") from exc
        self._output_names = tuple(s.name for s in self._outputs)
        self._path = str(path)
        self._loaded = True

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | RuntimeOptions | None) -> Any:
        if isinstance(options, cls.Options):
            return options
        try:
            return cls.Options.model_validate(dict(options or {}))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}={e.get('input')!r}: {e['msg']}" for e in exc.errors())
            raise InvalidOptions(f"{cls.name} options: {problems}") from exc

    def describe(self) -> ModelDescription:
        self._require_loaded()
        return ModelDescription(
            runtime=self.name,
            runtime_version=self.version(),
            device=self._device,
            path=self._path,
            inputs=self._inputs,
            outputs=self._outputs,
            details=dict(self._details),
        )

    def warmup(self, runs: int = 2) -> float:
        """Run zeros through the model (dynamic dims as 1); returns the last run's seconds.

        Why: the first call pays for lazy allocation, JIT and kernel selection; a
        request must not.
        """
        self._require_loaded()
        sample = {s.name: np.zeros([d if d >= 0 else 1 for d in s.shape], dtype=s.accepts) for s in self._inputs}
        elapsed = 0.0
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            self.infer(sample)
            elapsed = time.perf_counter() - t0
        return elapsed

    def infer(self, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
        if not self._loaded:
            raise RuntimeClosed(f"{self.name}: no model loaded")
        arrays = validate_inputs(self._inputs, inputs)
        with self._lock:
            if not self._loaded:  # closed while this request was being validated
                raise RuntimeClosed(f"{self.name}: closed")
            try:
                outputs = self._run(arrays)
            except EdgefleetError:
                raise
            except Exception as exc:
                raise InferenceError(f"{self.name} failed during inference: {_one_line(exc)}") from exc
        return dict(zip(self._output_names, outputs))

    def close(self) -> None:
        with self._lock:
            if self._loaded:
                self._loaded = False
                self._close()

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise RuntimeClosed(f"{self.name}: no model loaded")

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]


def registered() -> dict[str, type[Runtime]]:
    return dict(_REGISTRY)
