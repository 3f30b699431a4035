"""ONNX Runtime: the universal fallback, on every architecture.

The execution providers are ordered from the hardware: TensorRT and CUDA on an
NVIDIA GPU, OpenVINO on Intel, and always the CPU last so a model the faster
provider cannot take still runs. The hardware comes from the profile the caller
passes to ``load``; this runtime never detects it itself.

Placement: on CUDA after TensorRT (no engine build); the fallback on every CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from agent.errors import RuntimeUnavailable
from agent.runtimes import register
from agent.runtimes.base import GPU_PRECISIONS, Band, ProbeResult, Runtime, RuntimeOptions, Tier, cpu_precisions, x86_isa
from agent.runtimes.tensors import TensorSpec

if TYPE_CHECKING:
    from agent.hardware import HardwareProfile

# Device names we accept (as in selection's candidates) and the providers they put first.
DEVICE_PROVIDERS: dict[str, tuple[str, ...]] = {
    "TENSORRT": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
    "CUDA": ("CUDAExecutionProvider",),
    "OPENVINO": ("OpenVINOExecutionProvider",),
    "CPU": (),
}
PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider")
CPU = "CPUExecutionProvider"

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


class OnnxOptions(RuntimeOptions):
    providers: list[str] | None = None  # an explicit provider list overrides the device
    intra_op_threads: int = 0  # 0: onnxruntime's default
    # How long an idle worker thread busy-waits for the next parallel section before it sleeps (onnxruntime 1.26 and
    # later turn it into a count of pause instructions, so it is approximate; earlier ones cannot bound it, and their
    # workers then sleep at once). Why bounded: a model's call is a series of parallel sections microseconds apart,
    # and a worker that sleeps between them is woken again for each; onnxruntime's own spin (2^20 pauses, about 24 ms
    # on the machine measured) takes a core from the device's application between requests. Measured on 2 cores,
    # 512-wide MLP, two threads (benchmarks/idle_cores.py): back to back 35-39 us a call with 20 us of spin, 35-36
    # with onnxruntime's, 136-175 never spinning; one request every 0.3 ms: 122-129 us a call for 248-256 us of CPU
    # with 20 us, 158-162 for 230-231 never spinning, 72-74 for 544-564 with onnxruntime's. 0: never spin.
    spin_us: int = Field(default=20, ge=0, le=1_000_000, strict=True)
    # True: onnxruntime's own spin (``spin_us`` then does not apply), for a device that runs nothing but inference.
    allow_spinning: bool = False
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"


@cache
def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeUnavailable("onnxruntime is not installed (extra: onnx)") from exc
    onnxruntime.set_default_logger_severity(3)  # errors only: our own logs say what matters
    return onnxruntime


def provider_order(device: str | None, available: list[str], profile: HardwareProfile | None = None) -> list[str]:
    """Providers for a device: the device's own first, CPU last, only what is installed.

    With ``AUTO`` the hardware decides: GPU providers only where a CUDA GPU (or a
    Jetson) exists, the OpenVINO provider only on Intel hardware — an installed
    provider without its hardware only costs a failed initialisation.
    """
    device = (device or "AUTO").upper()
    if device == "AUTO":
        wanted = [p for p in PREFERENCE if p in available and _fits_hardware(p, profile)]
    elif device in DEVICE_PROVIDERS:
        wanted = list(DEVICE_PROVIDERS[device])
        missing = [p for p in wanted[:1] if p not in available]
        if missing:
            raise RuntimeUnavailable(f"onnxruntime provider {missing[0]} is not installed (available: {', '.join(available)})")
        wanted = [p for p in wanted if p in available]
    else:
        raise RuntimeUnavailable(f"onnxruntime device must be one of AUTO, {', '.join(DEVICE_PROVIDERS)}; got {device}")
    return [*wanted, CPU]


def _fits_hardware(provider: str, profile: HardwareProfile | None) -> bool:
    if profile is None:
        return True
    if provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        return profile.has_cuda_gpu
    if provider == "OpenVINOExecutionProvider":
        return profile.intel_npu or profile.intel_gpu or "intel" in profile.cpu.model.lower()
    return True


BOUNDED_SPIN_SINCE = (1, 26)  # the first onnxruntime with session.intra_op.spin_duration_us


@dataclass(frozen=True)
class SpinPlan:
    """The session config entries for the options' spinning on one onnxruntime version, and what ``describe()`` says
    of them: planned, not applied."""

    entries: dict[str, str]
    said: str  # "20 us", "onnxruntime's own", "off", or why it is off


def spin_plan(opts: OnnxOptions, version: str) -> SpinPlan:
    """An onnxruntime before 1.26 ignores a spin duration it does not know and would spin its own long spin, so there
    the workers sleep at once instead."""
    if opts.allow_spinning:
        return SpinPlan(_spinning("1"), "onnxruntime's own")
    if opts.spin_us == 0:
        return SpinPlan(_spinning("0"), "off")
    if _release(version) < BOUNDED_SPIN_SINCE:
        return SpinPlan(_spinning("0"), f"off: onnxruntime {version} cannot bound a spin (1.26 can)")
    us = str(opts.spin_us)
    bounded = {"session.intra_op.spin_duration_us": us, "session.inter_op.spin_duration_us": us}
    return SpinPlan(_spinning("1") | bounded, f"{us} us")


def _spinning(allow: str) -> dict[str, str]:
    return {"session.intra_op.allow_spinning": allow, "session.inter_op.allow_spinning": allow}


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``1.26.0`` or ``1.27.0.dev20260401``; (0, 0) when unreadable."""
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return 0, 0


@register
class OnnxRuntime(Runtime):
    name = "onnx"
    formats = frozenset({"onnx"})
    Options = OnnxOptions
    default_device = "AUTO"
    variants = ("onnx-fp32", "onnx-int8")
    fleet_order = 40
    universal = True
    reference_for = "onnx"

    @classmethod
    def tiers(cls, profile: HardwareProfile) -> list[Tier]:
        tiers = []
        if profile.has_cuda_gpu:
            what = f"Jetson {profile.jetson_model}" if profile.is_jetson else "NVIDIA GPU"
            reason = f"{what}: ONNX Runtime on CUDA needs no engine build"
            tiers.append(Tier(Band.CUDA_GPU + 1, cls.name, "CUDA", ("onnx",), reason, GPU_PRECISIONS))
        cpu = cpu_precisions(profile)
        if profile.is_arm:
            tiers.append(Tier(Band.CPU + 1, cls.name, "CPU", ("onnx",), "ARM CPU: ONNX Runtime, the universal fallback", cpu))
        else:
            tiers.append(
                Tier(Band.CPU + 1, cls.name, "CPU", ("onnx",), f"x86 CPU ({x86_isa(profile)}): ONNX Runtime on its MLAS kernels", cpu)
            )
        return tiers

    @classmethod
    def probe(cls) -> ProbeResult:
        try:
            ort = _ort()
        except RuntimeUnavailable as exc:
            return ProbeResult(cls.name, False, reason=str(exc))
        providers = ort.get_available_providers()
        devices = tuple(d for d, ps in DEVICE_PROVIDERS.items() if not ps or ps[0] in providers)
        return ProbeResult(cls.name, True, ort.__version__, devices, reason="providers: " + ", ".join(providers))

    def _load(self, path: Path, fmt: str, device: str | None, options: Any, profile: HardwareProfile | None) -> None:
        ort = _ort()
        opts: OnnxOptions = options
        providers = opts.providers or provider_order(device, ort.get_available_providers(), profile)
        so = ort.SessionOptions()
        so.intra_op_num_threads = opts.intra_op_threads
        so.log_severity_level = 3
        spin = spin_plan(opts, ort.__version__)
        for key, value in spin.entries.items():
            so.add_session_config_entry(key, value)
        levels = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[opts.graph_optimization])
        sess = ort.InferenceSession(str(path), so, providers=providers)
        self._session = sess
        self._inputs = tuple(_spec(a) for a in sess.get_inputs())
        self._outputs = tuple(_spec(a) for a in sess.get_outputs())
        self._in_names = [s.name for s in self._inputs]
        self._out_names = [s.name for s in self._outputs]
        used = sess.get_providers()
        self._device = used[0] if used else CPU
        self._details = {"providers": used, "requested_device": device or "AUTO", "spin": spin.said}
        # The bound fast path (see _Bound) on the CPU provider alone: elsewhere host buffers would add device copies.
        self._bindings: dict[tuple[tuple[int, ...], ...], _Bound] | None = {} if used == [CPU] else None

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        bindings = self._bindings
        if bindings is None:
            return self._session.run(self._out_names, dict(zip(self._in_names, arrays)))  # type: ignore[no-any-return]
        shapes = tuple([a.shape for a in arrays])
        bound = bindings.get(shapes)
        if bound is None:
            outputs: list[np.ndarray] = self._session.run(self._out_names, dict(zip(self._in_names, arrays)))
            if len(bindings) >= 8:  # ever-new shapes: keep a few bindings, not one per shape seen
                bindings.clear()
                self._forget_signatures()
            bindings[shapes] = _Bound(self._session, self._in_names, self._out_names, arrays, outputs)
            return outputs
        try:
            return bound.run(arrays)
        except Exception:
            return self._unbound(arrays)

    def _unbound(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """A bound call failed: run it plainly (which raises when the model itself fails), and when that works, the
        outputs' shapes depend on the values (NonZero, NMS), not only the inputs' shapes: plain calls from now on."""
        outputs: list[np.ndarray] = self._session.run(self._out_names, dict(zip(self._in_names, arrays)))
        self._bindings = None
        self._forget_signatures()
        self._details["bound_outputs"] = "off: output shapes vary with the input values"
        return outputs

    def _prepared(self, arr: np.ndarray) -> Callable[[np.ndarray], list[np.ndarray]] | None:
        bound = self._bindings.get((arr.shape,)) if self._bindings is not None else None
        return None if bound is None else bound.one_input_call(self._unbound)

    def _close(self) -> None:
        self._bindings = None
        self._session = None


class _Bound:
    """An ``IOBinding`` of one set of input shapes to buffers of our own: the fastest way to call ONNX Runtime.

    Why: ``session.run`` wraps every input in a new OrtValue and allocates every output on
    each call; a binding made once is reused (measured on a 512-wide MLP: ~15% less per
    call, and half the time of a tiny model's call). Safety: the caller's arrays are copied
    into our input buffers (the binding never points into memory the caller may reuse or
    free), and the outputs are copied out of ours (a later call never overwrites a result
    a caller kept). Output shapes are learnt from a plain call on the same input shapes;
    a model whose output shapes then change with the values makes ONNX Runtime refuse
    the binding, and the runtime falls back to plain calls for good.
    """

    def __init__(self, session: Any, in_names: list[str], out_names: list[str], arrays: list[np.ndarray], outputs: list[np.ndarray]):
        self.inputs = [np.empty_like(a, order="C") for a in arrays]
        self.outputs = [np.empty_like(o, order="C") for o in outputs]
        self.io = session.io_binding()
        for name, buf in zip(in_names, self.inputs):
            self.io.bind_cpu_input(name, buf)
        for name, buf in zip(out_names, self.outputs):
            self.io.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        # The C++ session's own call where it is there: the public one adds WebGPU graph-capture bookkeeping in Python
        # (a sixth of a tiny model's call), and this binding runs on the CPU provider only.
        native_run, native_io = getattr(getattr(session, "_sess", None), "run_with_iobinding", None), getattr(self.io, "_iobinding", None)
        if callable(native_run) and native_io is not None:
            self._run_with = partial(native_run, native_io, None)
        else:
            self._run_with = partial(session.run_with_iobinding, self.io)

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for buf, arr in zip(self.inputs, arrays):
            buf[...] = arr
        self._run_with()
        return [out.copy() for out in self.outputs]

    def one_input_call(self, unbound: Callable[[list[np.ndarray]], list[np.ndarray]]) -> Callable[[np.ndarray], list[np.ndarray]]:
        """``run`` for a one-input model as a closure (a request's prepared call, see ``Runtime.infer``): locals, not
        attributes, on the path that starts cold after each model call; ``unbound`` where the binding fails."""
        buf, run_with, outputs = self.inputs[0], self._run_with, self.outputs
        if len(outputs) == 1:
            (only,) = outputs

            def call_one_output(arr: np.ndarray) -> list[np.ndarray]:
                try:
                    buf[...] = arr
                    run_with()
                except Exception:
                    return unbound([arr])
                return [only.copy()]  # no comprehension: in Python 3.11 that is one more frame

            return call_one_output

        def call(arr: np.ndarray) -> list[np.ndarray]:
            try:
                buf[...] = arr
                run_with()
            except Exception:
                return unbound([arr])
            return [out.copy() for out in outputs]

        return call


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise RuntimeUnavailable(f"tensor {arg.name!r} has type {arg.type}, which edgefleet does not serve")
    return TensorSpec(arg.name, shape, np.dtype(dtype))
