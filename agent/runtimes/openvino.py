"""OpenVINO: Intel CPUs, integrated GPUs (``GPU.N``) and NPUs, plus ``AUTO``.

Reads OpenVINO IR (``.xml`` + ``.bin``), ONNX and TFLite directly. An ONNX model
that ``read_model`` refuses or reads with a dynamic rank (exporters' shape arithmetic,
an If whose branches differ in rank) is converted with static shapes: those of the
first sample the load's hints give (golden samples, ``--input``); ``describe()`` says
so. Without samples such a model fails to load with that reason. Compiled blobs
go to a cache directory because an NPU compile takes seconds and must not be
paid on every start. The hot path reuses one pre-created infer request and copies
the caller's arrays into its own tensors instead of passing a dict each call.

Placement: Intel NPU (static shapes) and Intel GPU; on x86 CPUs IR first, then
ONNX and TFLite behind ONNX Runtime and LiteRT; on ARM CPUs its ARM plugin last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.errors import InferenceError, ModelLoadError, RuntimeUnavailable
from agent.runtimes import register
from agent.runtimes.base import GPU_PRECISIONS, Band, ProbeResult, Runtime, RuntimeOptions, Tier, cpu_precisions, x86_isa
from agent.runtimes.hints import InputHints
from agent.runtimes.tensors import TensorSpec

if TYPE_CHECKING:
    from agent.hardware import HardwareProfile


class OpenVINOOptions(RuntimeOptions):
    cache_dir: Path | None = None  # compiled-model cache (CACHE_DIR); None disables it
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"
    num_threads: int | None = None  # INFERENCE_NUM_THREADS on CPU
    # CPUs with AVX-512 BF16/AMX default to bf16 inside OpenVINO, which silently moves an fp32
    # variant's answers ~1e-2 away from what parity verified; "f32" keeps them. None: OpenVINO's default.
    inference_precision: Literal["f32", "bf16", "f16"] | None = "f32"


@cache
def _core() -> Any:
    """One Core per process: creating it loads device plugins, which is slow."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise RuntimeUnavailable("openvino is not installed (extra: openvino)") from exc
    return ov.Core()


@register
class OpenVINORuntime(Runtime):
    name = "openvino"
    formats = frozenset({"openvino", "onnx", "tflite"})
    Options = OpenVINOOptions
    default_device = "AUTO"
    variants = ("openvino-fp16", "openvino-fp32", "openvino-int8")
    fleet_order = 20
    reference_for = "openvino"

    @classmethod
    def tiers(cls, profile: HardwareProfile) -> list[Tier]:
        tiers = []
        if profile.intel_npu:
            reason = "Intel NPU: OpenVINO with a static-shape variant"
            tiers.append(Tier(Band.NPU, cls.name, "NPU", ("openvino", "onnx"), reason, ("int8", "fp16", "fp32"), static_only=True))
        if profile.intel_gpu:
            tiers.append(Tier(Band.INTEGRATED_GPU, cls.name, "GPU", ("openvino", "onnx"), "Intel GPU: OpenVINO", GPU_PRECISIONS))
        cpu = cpu_precisions(profile)
        if profile.is_arm:
            return [*tiers, Tier(Band.CPU + 2, cls.name, "CPU", ("openvino", "onnx", "tflite"), "ARM CPU: OpenVINO's ARM plugin", cpu)]
        isa = x86_isa(profile)
        return [
            *tiers,
            Tier(Band.CPU + 0, cls.name, "CPU", ("openvino",), f"x86 CPU ({isa}): OpenVINO IR on oneDNN kernels", cpu),
            Tier(Band.CPU + 2, cls.name, "CPU", ("onnx",), f"x86 CPU ({isa}): OpenVINO reading ONNX", cpu),
            Tier(Band.CPU + 4, cls.name, "CPU", ("tflite",), f"x86 CPU ({isa}): OpenVINO reading TFLite", cpu),
        ]

    @classmethod
    def probe(cls) -> ProbeResult:
        try:
            core = _core()
            import openvino as ov

            version = ov.__version__.split("-")[0]
            devices = tuple(core.available_devices)
        except RuntimeUnavailable as exc:
            return ProbeResult(cls.name, False, reason=str(exc))
        return ProbeResult(cls.name, True, version, devices)

    def _load(self, path: Path, fmt: str, device: str | None, options: Any, profile: HardwareProfile | None) -> None:
        opts: OpenVINOOptions = options
        core = _core()
        device = (device or "AUTO").upper()
        family = device.split(".")[0]
        available = core.available_devices
        if family not in {"AUTO", "MULTI", "HETERO"} and not any(d.split(".")[0] == family for d in available):
            raise RuntimeUnavailable(f"OpenVINO device {device} not present (available: {', '.join(available)})")
        config: dict[str, Any] = {"PERFORMANCE_HINT": opts.performance_hint}
        if opts.cache_dir is not None:
            opts.cache_dir.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(opts.cache_dir)
        if opts.inference_precision is not None and family in {"CPU", "AUTO"}:
            config["INFERENCE_PRECISION_HINT"] = opts.inference_precision
        if opts.num_threads and family == "CPU":
            config["INFERENCE_NUM_THREADS"] = opts.num_threads
        model, converted = _read(core, path, fmt, self._hints)
        compiled = core.compile_model(model, device, config)
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        # Names from the model, not the compiled model: compiling merges the names of fused tensors, and any one of them
        # may come back (a Sigmoid's "output" as the "logit" before it).
        self._inputs = tuple(_spec(p, _name(m)) for p, m in zip(compiled.inputs, model.inputs))
        self._outputs = tuple(_spec(p, _name(m)) for p, m in zip(compiled.outputs, model.outputs))
        # Inputs are copied into the request's own (plugin-allocated) tensors: cheaper than
        # binding the caller's memory with set_input_tensor (measured ~6 us less on a tiny
        # model, ~10 us on a 512-wide MLP), and the request never keeps a pointer into an
        # array the caller may free (that ended in heap corruption in a test).
        self._in_views: list[np.ndarray | None] = [None] * len(self._inputs)
        self._n_out = len(self._outputs)
        self._infer = _direct_infer(self._request)
        try:
            used = compiled.get_property("EXECUTION_DEVICES")
            self._device = ",".join(used) if isinstance(used, list) else str(used)
        except RuntimeError:  # not every plugin reports it
            self._device = device
        self._details = {
            "requested_device": device,
            "performance_hint": opts.performance_hint,
            "cache_dir": str(opts.cache_dir) if opts.cache_dir else None,
        }
        if converted:
            self._details["converted"] = converted

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        req = self._request
        views = self._in_views
        for i, arr in enumerate(arrays):
            view = views[i]
            if view is None or view.shape != arr.shape:  # first call, or a dynamic dim changed
                tensor = req.get_input_tensor(i)
                if tuple(tensor.shape) != arr.shape:  # a fresh request's dynamic tensor is 0-sized
                    tensor.shape = arr.shape
                view = views[i] = tensor.data
                self._forget_signatures()  # their calls hold the view before
            view[...] = arr
        # Outputs shared (views of the request's output tensors, in output order): we copy what we
        # hand out, because the request reuses its output buffers on the next call.
        return [out.copy() for out in self._infer().values()]

    def _prepared(self, arr: np.ndarray) -> Callable[[np.ndarray], list[np.ndarray]] | None:
        """For a one-input model whose request tensor has ``arr``'s shape: ``_run`` as a closure on that tensor's view."""
        view = self._in_views[0] if len(self._in_views) == 1 else None
        if view is None or view.shape != arr.shape:
            return None
        infer = self._infer
        if self._n_out != 1:

            def call(a: np.ndarray) -> list[np.ndarray]:
                view[...] = a
                return [out.copy() for out in infer().values()]

            return call

        def call_one_output(a: np.ndarray) -> list[np.ndarray]:
            view[...] = a
            for out in infer().values():  # the one output, without a comprehension's frame
                return [out.copy()]
            raise InferenceError("openvino returned no output")

        return call_one_output

    def _close(self) -> None:
        self._in_views = []
        self._request = None
        self._compiled = None


def _direct_infer(request: Any) -> Callable[[], dict[Any, np.ndarray]]:
    """A call that runs ``request`` on the inputs already in its tensors and returns its outputs shared, by port.

    Why not ``request.infer(share_outputs=True)``: that is a Python layer over the pybind
    method (an input dispatcher for the ``None`` we would pass, an ``OVDict`` around the
    result): about a quarter of a tiny model's call. The pybind method with an empty
    input dict is the same run without them; where this OpenVINO lacks it, the public call.
    """
    try:
        from openvino._pyopenvino import InferRequest as RequestBase

        call = partial(RequestBase.infer, request, {}, True, True)  # inputs, share_outputs, decode_strings
    except (ImportError, AttributeError):
        return partial(request.infer, share_outputs=True)  # type: ignore[no-any-return]
    return call


def _read(core: Any, path: Path, fmt: str, hints: InputHints) -> tuple[Any, dict[str, Any] | None]:
    """The model as OpenVINO reads it; an ONNX file it cannot read with dynamic shapes, converted with the samples' static
    shapes — with what was done and why, for ``describe()``."""
    if fmt != "onnx":
        return core.read_model(str(path)), None
    try:
        model = core.read_model(str(path))
    except Exception as exc:  # the frontend's OpConversionFailure and friends: the shapes may be what it lacks
        if "OpConversionFailure" not in str(exc):  # not an ONNX it could parse (a corrupt file): no shapes will help
            raise
        why = f"read_model refused it: {' '.join(str(exc).split())[-300:]}"
    else:
        inputs_dynamic = any(p.get_partial_shape().rank.is_dynamic for p in model.inputs)
        outputs_dynamic = any(p.get_partial_shape().rank.is_dynamic for p in model.outputs)
        if not inputs_dynamic and (not outputs_dynamic or not hints.samples):  # dynamic-rank outputs alone may still run
            return model, None
        why = "read_model gives it a dynamic rank"
    shapes = hints.shapes()
    if not shapes:
        raise ModelLoadError(f"openvino cannot read {path.name} with dynamic shapes ({why}); no input shapes are known to convert it with")
    import openvino as ov

    # The batch axes named in the hints left dynamic first (requests of any batch size then still run), then the exact shapes.
    loose = [(n, s if n is None or hints.batch_axes.get(n) is None else _dynamic_at(s, hints.batch_axes[n])) for n, s in shapes]
    problems = []
    for tried in [loose, shapes] if loose != shapes else [shapes]:
        given = [s if n is None else (n, s) for n, s in tried]
        try:
            with _logging_kept():
                model = ov.convert_model(str(path), input=given)
        except Exception as exc:
            problems.append(f"with shapes {given}: {' '.join(str(exc).split())[-200:]}")
            continue
        done: dict[str, Any] = {"shapes": {n or "0": s for n, s in tried}, "why": why}
        return model, {**done, "failed_first": problems} if problems else done
    raise ModelLoadError(f"openvino could not convert {path.name} ({why}): " + "; ".join(problems))


@contextmanager
def _logging_kept() -> Iterator[None]:
    """``convert_model`` (through the TensorFlow it imports) sets the root logger to ERROR: the agent's own warnings would
    vanish for the rest of the process. The root logger's level and handlers are put back."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def _dynamic_at(shape: list[int], axis: int | None) -> list[int]:
    return [-1 if i == axis else d for i, d in enumerate(shape)]


def _name(port: Any) -> str:
    try:
        return str(port.get_any_name())
    except RuntimeError:  # unnamed tensors exist in converted models
        return f"tensor_{port.get_index()}"


def _spec(port: Any, name: str) -> TensorSpec:
    shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
    return TensorSpec(name, shape, np.dtype(port.get_element_type().to_dtype()))
