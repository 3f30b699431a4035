"""The one interface every inference runtime implements, and the policy each one declares.

Why a template: input validation, error typing and locking are the same for every
backend and must behave identically, so they live here once; a backend file only
says how to load a file and run already-validated arrays. Why policy on the class:
everything the rest of edgefleet needs to know about a runtime — its name, the
formats it reads, its options, where it should run (tiers, with reasons), its
default device, the bundle variants it prefers — is declared in that runtime's own
file, so adding a runtime is adding one file. Runtimes know tensors, not models: no
pre- or post-processing lives here.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.errors import (
    EdgefleetError,
    InferenceError,
    InvalidOptions,
    ModelLoadError,
    NonFiniteInput,
    RuntimeClosed,
    RuntimeUnavailable,
    UnsupportedModelFormat,
)
from agent.runtimes.formats import Precision, model_format
from agent.runtimes.hints import InputHints, warmup_inputs
from agent.runtimes.tensors import ZEROS_UP_TO, TensorSpec, all_finite, named_inputs, validate_inputs, with_batch_axes

if TYPE_CHECKING:
    from agent.hardware import HardwareProfile

__all__ = ["Band", "ModelDescription", "ProbeResult", "Runtime", "RuntimeOptions", "Tier", "GPU_PRECISIONS", "cpu_precisions", "x86_isa"]


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


class Band(IntEnum):
    """The shared scale every runtime's tiers are ordered on: lower is tried first.

    A runtime places a tier at a band plus a small offset that orders the runtimes
    sharing that band. The CPU band's offsets, by file: ARM — litert 0, onnx 1,
    openvino 2; x86 — openvino IR 0, onnx 1, openvino reading ONNX 2, litert 3,
    openvino reading TFLite 4.
    """

    CUDA_GPU = 100  # NVIDIA GPU or Jetson
    EDGE_TPU = 200  # Coral
    NPU = 300
    INTEGRATED_GPU = 400  # Intel GPU
    CPU = 500


@dataclass(frozen=True)
class Tier:
    """One place a runtime offers to run on this hardware, with the reason an operator reads.

    ``formats`` are tried in their order; ``precisions`` order the variants within a
    format. ``hint``: only variants compiled for that accelerator (``edgetpu``) —
    without one the tier never takes hinted variants. ``static_only``: only variants
    whose shapes are all static (the NPU compiles for fixed shapes).
    """

    order: int  # a Band plus an offset
    runtime: str
    device: str
    formats: tuple[str, ...]
    reason: str
    precisions: tuple[Precision, ...]
    hint: str | None = None
    static_only: bool = False


GPU_PRECISIONS: tuple[Precision, ...] = ("fp16", "fp32", "int8")


def cpu_precisions(profile: HardwareProfile) -> tuple[Precision, ...]:
    """int8 first where the CPU accelerates it (VNNI, AMX, ARM dot-product), else fp32 first."""
    int8_fast = profile.cpu.avx512_vnni or profile.cpu.amx or "avx_vnni" in profile.cpu.flags or profile.cpu.arm_dotprod
    return ("int8", "fp32", "fp16") if int8_fast else ("fp32", "fp16", "int8")


def x86_isa(profile: HardwareProfile) -> str:
    """The vector extensions named in x86 CPU reasons, e.g. ``avx2+avx512_vnni``."""
    return "+".join(f for f in ("avx2", "avx512_vnni", "amx_int8") if f in profile.cpu.flags) or "baseline"


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


class Runtime(ABC):
    """One loaded model on one runtime and device.

    Lifecycle: ``probe()`` (class level, no model) -> ``load()`` -> ``warmup()`` ->
    ``infer()`` any number of times, from any thread -> ``close()``.
    """

    # -- the policy each runtime declares in its own file -------------------
    name: ClassVar[str]
    formats: ClassVar[frozenset[str]]  # the MODEL_FORMATS this runtime reads
    Options: ClassVar[type[RuntimeOptions]] = RuntimeOptions
    default_device: ClassVar[str] = "CPU"  # where a forced runtime runs when the settings name no device
    # The bundle variant ids this runtime runs best, best first: what the controller assigns a device that
    # reports this runtime but not its own preference.
    variants: ClassVar[tuple[str, ...]] = ()
    fleet_order: ClassVar[int] = 100  # the controller tries runtimes' variants in this order (lower first)
    universal: ClassVar[bool] = False  # runs everywhere: its variants are the controller's last resort
    reference_for: ClassVar[str | None] = None  # the format whose variants the converters check on this runtime

    @classmethod
    def tiers(cls, profile: HardwareProfile) -> list[Tier]:
        """Where this runtime should run on this hardware, each place with its reason; none by default."""
        return []

    def __init__(self) -> None:
        self._lock = threading.Lock()  # backends' interpreters and infer requests are not thread-safe
        self._loaded = False
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._output_names: tuple[str, ...] = ()
        self._device = ""
        self._path = ""
        self._details: dict[str, Any] = {}
        self._hints = InputHints()
        # Shapes of the one input already accepted, each with its prepared call (see ``infer``).
        self._signatures: dict[tuple[int, ...], _Signature] = {}
        self._first_input = ""

    # -- implemented by each backend ----------------------------------------

    @classmethod
    @abstractmethod
    def probe(cls) -> ProbeResult:
        """Is the runtime importable, which version, which devices — without loading a model."""

    @abstractmethod
    def _load(self, path: Path, fmt: str, device: str | None, options: Any, profile: HardwareProfile | None) -> None:
        """Load the model; set ``_inputs``, ``_outputs`` and ``_device``. Raise ModelLoadError on failure.

        ``profile`` is the hardware the caller detected (None when it did not say); a
        runtime reads the hardware from it and never detects it again. ``self._hints``
        holds the inputs the model will see, for a backend that needs their shapes.
        """

    @abstractmethod
    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Run validated arrays (model input order); return outputs in model output order."""

    def _close(self) -> None:
        """Release the backend's resources."""

    @classmethod
    def version(cls) -> str:
        return cls.probe().version or "unknown"

    # -- the shared template ------------------------------------------------

    def load(
        self,
        path: str | Path,
        device: str | None = None,
        options: Mapping[str, Any] | RuntimeOptions | None = None,
        profile: HardwareProfile | None = None,
        hints: InputHints | None = None,
    ) -> None:
        """Load ``path``. ``hints``: inputs the model will see (golden samples, the user's) and each tensor's batch axis;
        warm-up runs the first sample, and a backend that must fix shapes to read the file takes them from it."""
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        fmt = model_format(path)
        if fmt not in self.formats:
            raise UnsupportedModelFormat(f"{self.name} cannot read {fmt} models ({path.name})")
        opts = self.parse_options(options)
        self._hints = hints or InputHints()
        probe = self.probe()
        if not probe.available:
            raise RuntimeUnavailable(f"{self.name} is not available here: {probe.reason}")
        try:
            self._load(path, fmt, device, opts, profile)
        except EdgefleetError:
            raise
        except Exception as exc:  # a backend's own exception types: give them ours, keep the message
            raise ModelLoadError(f"{self.name} could not load {path.name}: {_one_line(exc)}") from exc
        self._inputs = with_batch_axes(self._inputs, self._hints.batch_axes)
        self._outputs = with_batch_axes(self._outputs, self._hints.batch_axes)
        self._output_names = tuple(s.name for s in self._outputs)
        self._first_input = self._inputs[0].name if len(self._inputs) == 1 else ""  # "": several inputs, no signatures
        self._forget_signatures()
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
        """Run inputs the model accepts through it; returns the last run's seconds.

        Why: the first call pays for lazy allocation, JIT and kernel selection; a
        request must not. The inputs: the first sample of the load's hints, else
        synthetic zeros by the dimension policy of ``agent.runtimes.hints``.
        """
        self._require_loaded()
        t0 = time.perf_counter()
        sample, how = warmup_inputs(self._inputs, self._hints, self.infer)
        elapsed = time.perf_counter() - t0
        self._details["warmup_inputs"] = how
        for _ in range(max(1, runs - 1)):  # timed apart from the first: that one may include sizes the model refused
            t0 = time.perf_counter()
            self.infer(sample)
            elapsed = time.perf_counter() - t0
        return elapsed

    def check(self, inputs: Mapping[str, object] | np.ndarray) -> list[np.ndarray]:
        """The arrays ``infer`` would run for ``inputs`` (one bare array: the only input), or the typed reason it would refuse
        them — what the caller's inputs are checked with before warm-up, so a bad input is the caller's error, not the model's."""
        self._require_loaded()
        return validate_inputs(self._inputs, named_inputs(self._inputs, inputs))

    def infer(self, inputs: Mapping[str, object] | np.ndarray) -> dict[str, np.ndarray]:
        """Run one request: by name, or one bare array for a one-input model.

        A one-input request whose array has a shape, dtype and layout this runtime already accepted (a ``_Signature``)
        skips to the finiteness check and the backend's prepared call: what every request after the first of a
        stream is. Anything else, and the first of each shape, takes ``_infer_checked``, every check spelled out."""
        if type(inputs) is dict and len(inputs) == 1:
            value = inputs.get(self._first_input)
            if type(value) is np.ndarray:
                signatures = self._signatures
                signature = signatures.get(value.shape)
                if signature is not None and value.dtype is signature.dtype and value.flags.c_contiguous:
                    # One frame for all of it: on a model larger than the CPU's caches, each Python step after the
                    # model's call starts cold, and a frame more is a microsecond more (benchmarks/runtime_overhead.py).
                    zeros = signature.zeros
                    if zeros is not None:
                        try:
                            nonfinite = value.ravel().dot(zeros)  # 0 when finite, else NaN (all_finite); np.vdot costs 0.2 us more
                        except (RuntimeWarning, FloatingPointError):  # warnings or np.seterr as errors: an infinity met a zero
                            nonfinite = True
                        if nonfinite:
                            raise NonFiniteInput(f"input '{self._first_input}': contains NaN or infinity")
                    elif signature.floating and not all_finite(value):
                        raise NonFiniteInput(f"input '{self._first_input}': contains NaN or infinity")
                    with self._lock:
                        # Another thread may have closed the model or moved the backend's buffers since the lookup:
                        # both replace the signatures (never clear them in place), and the checked path decides.
                        current = self._signatures is signatures
                        if current:
                            try:
                                outputs = signature.run(value)
                            except EdgefleetError:
                                raise
                            except Exception as exc:
                                raise InferenceError(f"{self.name} failed during inference: {_one_line(exc)}") from exc
                    if not current:
                        return self._infer_checked(inputs)
                    names = self._output_names
                    if len(names) == 1:
                        return {names[0]: outputs[0]}
                    return dict(zip(names, outputs))
        return self._infer_checked(inputs)

    def _infer_checked(self, inputs: Mapping[str, object] | np.ndarray) -> dict[str, np.ndarray]:
        if not self._loaded:
            raise RuntimeClosed(f"{self.name}: no model loaded")
        if isinstance(inputs, np.ndarray):
            inputs = named_inputs(self._inputs, inputs)
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
            if len(arrays) == 1 and type(inputs) is dict and inputs.get(self._first_input) is arrays[0]:
                self._remember(arrays[0])  # the caller's own array passed as it was: its kind may skip the checks
        names = self._output_names
        if len(names) == 1:  # most models: one literal beats dict(zip()) by a third of a microsecond
            return {names[0]: outputs[0]}
        return dict(zip(names, outputs))

    def _remember(self, arr: np.ndarray) -> None:
        """Keep ``arr``'s shape and dtype as accepted, with the backend's call prepared for it (under the lock)."""
        if len(self._signatures) >= 8:  # ever-new shapes: keep a few, not one per shape seen
            self._forget_signatures()
        spec = self._inputs[0]
        zeros = np.zeros(arr.size, arr.dtype) if spec.floating and arr.size <= ZEROS_UP_TO else None
        self._signatures[arr.shape] = _Signature(arr.dtype, spec.floating, zeros, self._prepared(arr) or self._run_one)

    def _run_one(self, arr: np.ndarray) -> list[np.ndarray]:
        return self._run([arr])

    def _prepared(self, arr: np.ndarray) -> Callable[[np.ndarray], list[np.ndarray]] | None:
        """A backend's own call for one input of ``arr``'s shape and dtype (just run by ``_run``), or None for ``_run``.

        Called under the lock; the call it returns runs under it too. A backend whose prepared calls stop being valid
        (buffers reallocated, a binding dropped) calls ``_forget_signatures``."""
        return None

    def _forget_signatures(self) -> None:
        """Drop every signature by replacing the dict: a request that looked one up before sees it gone (``infer``)."""
        self._signatures = {}

    def close(self) -> None:
        with self._lock:
            if self._loaded:
                self._loaded = False
                self._forget_signatures()
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


@dataclass(frozen=True, slots=True)
class _Signature:
    """An input shape and dtype the checks accepted, with what a request of it still needs: the finiteness check
    (``zeros`` of its shape for the dot product, or the general check for large floating inputs) and the call."""

    dtype: np.dtype[Any]
    floating: bool
    zeros: np.ndarray | None
    run: Callable[[np.ndarray], list[np.ndarray]]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]
