"""One producer per variant: how to make it from a source, or why it cannot be made here.

A variant is named by its format and precision (``agent.runtimes.formats``), the
names the bundle, the runtimes' preferences and the controller use.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.runtimes.formats import ModelFormat, Precision, variant_id
from converters.errors import BuildError, SkipVariant
from converters.source import Source

Producer = Callable[[Source, Path, dict[str, np.ndarray]], list[Path]]


@dataclass(frozen=True)
class VariantKind:
    format: ModelFormat
    precision: Precision
    produce: Producer

    @property
    def id(self) -> str:
        return variant_id(self.format, self.precision)


def _onnx_fp32(src: Source, out: Path, samples: dict[str, np.ndarray]) -> list[Path]:
    if src.format != "onnx":
        raise SkipVariant(f"no {src.format} -> ONNX converter is installed (tf2onnx is not an edgefleet dependency)")
    dest = out / "model.onnx"
    shutil.copyfile(src.path, dest)
    return [dest]


def _onnx_int8(src: Source, out: Path, samples: dict[str, np.ndarray]) -> list[Path]:
    if src.format != "onnx":
        raise SkipVariant(f"no {src.format} -> ONNX converter is installed, so no ONNX int8 either")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    count = next(iter(samples.values())).shape[0]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= count:
                return None
            item = {k: v[self.i : self.i + 1] for k, v in samples.items()}
            self.i += 1
            return item

    dest = out / "model_int8.onnx"
    quantize_static(
        str(src.path),
        str(dest),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=False,
    )
    return [dest]


def _openvino(precision: str) -> Producer:
    def produce(src: Source, out: Path, samples: dict[str, np.ndarray]) -> list[Path]:
        if precision == "int8":
            try:
                import nncf  # noqa: F401
            except ImportError:
                raise SkipVariant("nncf is not installed (extra: convert)") from None
        dest = out / f"model_openvino_{precision}.xml"
        args = [sys.executable, "-m", "converters._openvino_child", str(src.path), str(dest), precision]
        if precision == "int8":
            np.savez(out / ".calibration.npz", **samples)  # type: ignore[arg-type]
            args.append(str(out / ".calibration.npz"))
        done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
        (out / ".calibration.npz").unlink(missing_ok=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            raise BuildError(f"OpenVINO {precision} conversion failed: {' '.join(tail)}")
        return [dest, dest.with_suffix(".bin")]

    return produce


def _tflite_from_tensorflow(src: Source, out: Path, samples: dict[str, np.ndarray], precision: str) -> list[Path]:
    from converters.source import tensorflow_child

    dest = out / ("model.tflite" if precision == "fp32" else "model_int8.tflite")
    args = ["tflite", str(src.path), str(dest), precision]
    if precision == "int8":
        np.savez(out / ".calibration.npz", **samples)  # type: ignore[arg-type]
        args.append(str(out / ".calibration.npz"))
    try:
        tensorflow_child(*args)
    finally:
        (out / ".calibration.npz").unlink(missing_ok=True)
    return [dest]


def _tflite_fp32(src: Source, out: Path, samples: dict[str, np.ndarray]) -> list[Path]:
    if src.is_tensorflow:
        return _tflite_from_tensorflow(src, out, samples, "fp32")
    if src.format != "tflite":
        raise SkipVariant("ONNX -> TFLite needs a TensorFlow-based converter (onnx2tf), which edgefleet does not ship")
    if any(t.quantization for t in src.inputs):
        raise SkipVariant("the source TFLite is int8; it becomes the tflite-int8 variant")
    dest = out / "model.tflite"
    shutil.copyfile(src.path, dest)
    return [dest]


def _tflite_int8(src: Source, out: Path, samples: dict[str, np.ndarray]) -> list[Path]:
    if src.is_tensorflow:
        return _tflite_from_tensorflow(src, out, samples, "int8")
    if src.format == "tflite" and any(t.quantization for t in src.inputs):
        dest = out / "model_int8.tflite"
        shutil.copyfile(src.path, dest)
        return [dest]
    raise SkipVariant("full-integer TFLite needs the TensorFlow model (Keras or SavedModel source)")


KINDS: dict[str, VariantKind] = {
    k.id: k
    for k in (
        VariantKind("tflite", "fp32", _tflite_fp32),
        VariantKind("tflite", "int8", _tflite_int8),
        VariantKind("openvino", "fp32", _openvino("fp32")),
        VariantKind("openvino", "fp16", _openvino("fp16")),
        VariantKind("openvino", "int8", _openvino("int8")),
        VariantKind("onnx", "fp32", _onnx_fp32),
        VariantKind("onnx", "int8", _onnx_int8),
    )
}
