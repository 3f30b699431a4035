"""OpenVINO: Intel CPUs, integrated GPUs (``GPU.N``) and NPUs, plus ``AUTO``.

Reads OpenVINO IR (``.xml`` + ``.bin``), ONNX and TFLite directly. Compiled blobs
go to a cache directory because an NPU compile takes seconds and must not be
paid on every start. The hot path reuses one pre-created infer request and copies
the caller's arrays into its own tensors instead of passing a dict each call.

Placement: Intel NPU (static shapes) and Intel GPU; on x86 CPUs IR first, then
ONNX and TFLite behind ONNX Runtime and LiteRT; on ARM CPUs its ARM plugin last.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.errors import RuntimeUnavailable
from agent.runtimes import register
from agent.runtimes.base import GPU_PRECISIONS, Band, ProbeResult, Runtime, RuntimeOptions, Tier, cpu_precisions, x86_isa
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
        model = core.read_model(str(path))
        compiled = core.compile_model(model, device, config)
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._inputs = tuple(_spec(p) for p in compiled.inputs)
        self._outputs = tuple(_spec(p) for p in compiled.outputs)
        # Inputs are copied into the request's own (plugin-allocated) tensors: cheaper than
        # binding the caller's memory with set_input_tensor (measured ~6 us less on a tiny
        # model, ~10 us on a 512-wide MLP), and the request never keeps a pointer into an
        # array the caller may free (that ended in heap corruption in a test).
        self._in_views: list[np.ndarray | None] = [None] * len(self._inputs)
        self._n_out = len(self._outputs)
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
            np.copyto(view, arr)
        # share_outputs: skip the OVDict of output copies; we copy what we hand out below,
        # because the request reuses its output buffers on the next call.
        req.infer(share_outputs=True)
        get = req.get_output_tensor
        return [get(i).data.copy() for i in range(self._n_out)]

    def _close(self) -> None:
        self._in_views = []
        self._request = None
        self._compiled = None


def _spec(port: Any) -> TensorSpec:
    shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
    try:
        name = port.get_any_name()
    except RuntimeError:  # unnamed tensors exist in converted models
        name = f"tensor_{port.get_index()}"
    return TensorSpec(name, shape, np.dtype(port.get_element_type().to_dtype()))
