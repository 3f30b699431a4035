"""LiteRT (TensorFlow Lite): the runtime for ARM boards and the Coral Edge TPU.

Imports ``ai_edge_litert`` and falls back to ``tflite_runtime`` (armv7 and older
Pythons, where ai-edge-litert has no wheel). int8 models take and return floats:
inputs are quantized and outputs dequantized with each tensor's own parameters.

Placement: first on a Coral with an Edge TPU compiled variant; the native runtime
of ARM CPUs (XNNPACK); on x86 after OpenVINO and ONNX Runtime.
"""

from __future__ import annotations

import ctypes.util
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import RuntimeUnavailable
from agent.runtimes import register
from agent.runtimes.base import Band, ProbeResult, Runtime, RuntimeOptions, Tier, cpu_precisions, x86_isa
from agent.runtimes.formats import EDGETPU
from agent.runtimes.tensors import TensorSpec, dequantize, quantize

if TYPE_CHECKING:
    from agent.hardware import HardwareProfile

EDGETPU_LIBRARY = "libedgetpu.so.1"


class LiteRTOptions(RuntimeOptions):
    num_threads: int | None = None  # None: the interpreter's default
    edgetpu_library: str = EDGETPU_LIBRARY
    edgetpu_device: str | None = None  # "usb", "usb:0", "pci:0"; None: the first found


@cache
def _interpreter_module() -> tuple[Any, str, str]:
    """(module, distribution, version) of the first LiteRT interpreter that imports."""
    try:
        from importlib.metadata import version

        from ai_edge_litert import interpreter as mod

        return mod, "ai-edge-litert", version("ai-edge-litert")
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        from tflite_runtime import interpreter as mod  # type: ignore[import-not-found,no-redef]

        return mod, "tflite-runtime", version("tflite-runtime")
    except ImportError as exc:
        raise RuntimeUnavailable("neither ai-edge-litert nor tflite-runtime is installed (extra: litert)") from exc


def _edgetpu_present(library: str = EDGETPU_LIBRARY) -> bool:
    return ctypes.util.find_library("edgetpu") is not None or Path("/usr/lib", library).exists()


@register
class LiteRTRuntime(Runtime):
    name = "litert"
    formats = frozenset({"tflite"})
    Options = LiteRTOptions
    variants = ("tflite-fp32", "tflite-int8")
    fleet_order = 30
    reference_for = "tflite"

    @classmethod
    def tiers(cls, profile: HardwareProfile) -> list[Tier]:
        cpu = cpu_precisions(profile)
        tiers = []
        if profile.has_coral:
            tiers.append(
                Tier(
                    Band.EDGE_TPU,
                    cls.name,
                    "EDGETPU",
                    ("tflite",),
                    "Coral Edge TPU with an Edge TPU compiled variant",
                    ("int8",),
                    hint=EDGETPU,
                )
            )
        if profile.is_arm:
            tiers.append(Tier(Band.CPU + 0, cls.name, "CPU", ("tflite",), "ARM CPU: LiteRT with XNNPACK is the native runtime", cpu))
        else:
            tiers.append(Tier(Band.CPU + 3, cls.name, "CPU", ("tflite",), f"x86 CPU ({x86_isa(profile)}): LiteRT with XNNPACK", cpu))
        return tiers

    @classmethod
    def probe(cls) -> ProbeResult:
        try:
            _, dist, version = _interpreter_module()
        except RuntimeUnavailable as exc:
            return ProbeResult(cls.name, False, reason=str(exc))
        devices = ("CPU", "EDGETPU") if _edgetpu_present() else ("CPU",)
        return ProbeResult(cls.name, True, version, devices, reason=f"via {dist}")

    def _load(self, path: Path, fmt: str, device: str | None, options: Any, profile: HardwareProfile | None) -> None:
        mod, _, _ = _interpreter_module()
        opts: LiteRTOptions = options
        device = (device or "CPU").upper()
        delegates = []
        if device == "EDGETPU":
            try:
                dev_opts = {"device": opts.edgetpu_device} if opts.edgetpu_device else {}
                delegates.append(mod.load_delegate(opts.edgetpu_library, dev_opts))
            except (OSError, ValueError) as exc:  # what load_delegate raises when the library or device is missing
                raise RuntimeUnavailable(f"Edge TPU delegate unavailable: {exc}") from exc
        elif device != "CPU":
            raise RuntimeUnavailable(f"litert runs on CPU or EDGETPU, not {device}")
        interp = mod.Interpreter(model_path=str(path), num_threads=opts.num_threads, experimental_delegates=delegates or None)
        interp.allocate_tensors()
        self._interp = interp
        self._in_index = [d["index"] for d in interp.get_input_details()]
        self._out_index = [d["index"] for d in interp.get_output_details()]
        names = _signature_names(interp)
        self._inputs = tuple(_spec(d, names) for d in interp.get_input_details())
        self._outputs = tuple(_spec(d, names) for d in interp.get_output_details())
        self._shapes = [tuple(int(x) for x in d["shape"]) for d in interp.get_input_details()]
        self._quantized = any(s.quantization for s in self._inputs + self._outputs)
        one = len(self._in_index) == 1 and len(self._out_index) == 1 and not self._quantized
        self._single = (self._in_index[0], self._out_index[0]) if one else None
        self._direct = one and _direct_calls_work(interp, self._out_index[0])
        self._device = device
        self._details = {"num_threads": opts.num_threads, "delegates": [opts.edgetpu_library] if delegates else []}

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        # set_tensor copies the caller's array into the interpreter's own buffer and get_tensor copies the output out:
        # nothing of the caller's is kept, and no later call overwrites a result handed out.
        interp = self._interp
        single = self._single
        if single is not None and arrays[0].shape == self._shapes[0]:  # one float input and output, its size unchanged
            if self._direct:
                return _run_direct(interp, single, arrays[0])
            interp.set_tensor(single[0], arrays[0])
            interp.invoke()
            return [interp.get_tensor(single[1])]
        if [a.shape for a in arrays] != self._shapes:
            self._resize(arrays)
        if self._quantized:
            for i, arr in enumerate(arrays):
                interp.set_tensor(self._in_index[i], quantize(arr, self._inputs[i]))
            interp.invoke()
            return [dequantize(interp.get_tensor(idx), spec) for idx, spec in zip(self._out_index, self._outputs)]
        for idx, arr in zip(self._in_index, arrays):
            interp.set_tensor(idx, arr)
        interp.invoke()
        return [interp.get_tensor(idx) for idx in self._out_index]

    def _prepared(self, arr: np.ndarray) -> Callable[[np.ndarray], list[np.ndarray]] | None:
        """For one float input and output of the size the interpreter holds: ``_run``'s first branch as a closure."""
        single = self._single
        if single is None or arr.shape != self._shapes[0]:
            return None
        interp, (index_in, index_out) = self._interp, single
        if not self._direct:

            def call(a: np.ndarray) -> list[np.ndarray]:
                interp.set_tensor(index_in, a)
                interp.invoke()
                return [interp.get_tensor(index_out)]

            return call

        def call_direct(a: np.ndarray) -> list[np.ndarray]:  # _run_direct's calls, the wrapper looked up per call as there
            wrapper = interp._interpreter
            wrapper.SetTensor(index_in, a)
            wrapper.Invoke()
            return [wrapper.GetTensor(index_out, 0)]

        return call_direct

    def _resize(self, arrays: list[np.ndarray]) -> None:
        """New sizes of dynamic dims (validation already refused changes to static ones)."""
        interp = self._interp
        resized = [i for i, arr in enumerate(arrays) if arr.shape != self._shapes[i]]
        for i in resized:
            interp.resize_tensor_input(self._in_index[i], list(arrays[i].shape), strict=True)
        interp.allocate_tensors()
        self._forget_signatures()  # their calls were prepared for the sizes before
        for i in resized:  # only once allocation succeeded: a failure retries the resize next call
            self._shapes[i] = arrays[i].shape

    def _close(self) -> None:
        self._interp = None


def _direct_calls_work(interp: Any, out_index: int) -> bool:
    """Does this interpreter's own pybind wrapper take the calls ``_run_direct`` makes (tflite-runtime's older ones differ)?"""
    try:
        interp._interpreter.GetTensor(out_index, 0)
        return all(callable(getattr(interp._interpreter, m, None)) for m in ("SetTensor", "Invoke"))
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return False


def _run_direct(interp: Any, single: tuple[int, int], arr: np.ndarray) -> list[np.ndarray]:
    """``set_tensor``, ``invoke``, ``get_tensor`` through the interpreter's pybind wrapper itself.

    Why: the public methods are Python frames around the wrapper's (``invoke`` adds a
    check that no ``tensor()`` view is outstanding, through ``sys.getrefcount``): about a
    fifth of a tiny model's call. This runtime never takes ``tensor()`` views, so the check
    has nothing to find. The wrapper is looked up per call and not kept: a reference held
    between calls would make that check refuse the public calls (resizing, int8 models).
    ``SetTensor`` copies the caller's array into the interpreter's buffer and ``GetTensor``
    copies the output out, as the public ones do.
    """
    wrapper = interp._interpreter
    wrapper.SetTensor(single[0], arr)
    wrapper.Invoke()
    return [wrapper.GetTensor(single[1], 0)]


def _signature_names(interp: Any) -> dict[int, str]:
    """Tensor index -> name from the model's only SignatureDef, when it has exactly one.

    Why: a TFLite file converted from TensorFlow names its tensors
    ``serving_default_x:0`` and ``StatefulPartitionedCall:0``; the signature keeps
    the names the model was built with (``x``, ``output_0``), which are the names
    the OpenVINO and ONNX variants of the same model use.
    """
    try:
        signatures = interp.get_signature_list()
        if len(signatures) != 1:
            return {}
        runner = interp.get_signature_runner(next(iter(signatures)))
        details = {**runner.get_input_details(), **runner.get_output_details()}
    except (AttributeError, ValueError, RuntimeError):  # old tflite-runtime, or a malformed signature
        return {}
    return {int(d["index"]): str(name) for name, d in details.items()}


def _spec(detail: dict[str, Any], names: dict[int, str]) -> TensorSpec:
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    dtype = np.dtype(detail["dtype"])
    quant = (float(scale), int(zero_point)) if scale and dtype.kind in "iu" else None
    return TensorSpec(names.get(int(detail["index"]), detail["name"]), tuple(int(d) for d in shape), dtype, quant)
