"""Model file formats a bundle can carry, the variant ids built from them, and telling a file's format.

Why apart from the runtimes: a format belongs to the bundle, and several runtimes read
the same one (OpenVINO reads ONNX and TFLite too). Each runtime names the formats it
reads from ``MODEL_FORMATS``; a variant id is ``<format>-<precision>`` (``onnx-int8``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from agent.errors import ModelLoadError, UnsupportedModelFormat

__all__ = ["MODEL_FORMATS", "PRECISIONS", "EDGETPU", "ModelFormat", "Precision", "model_format", "variant_id"]

ModelFormat = Literal["tflite", "openvino", "onnx"]
Precision = Literal["fp32", "fp16", "int8"]
MODEL_FORMATS: tuple[str, ...] = get_args(ModelFormat)
PRECISIONS: tuple[str, ...] = get_args(Precision)
EDGETPU = "edgetpu"  # a variant hint: compiled for the Edge TPU, useless without one


def variant_id(fmt: str, precision: str) -> str:
    """The bundle's name for a variant of this format and precision, e.g. ``onnx-int8``."""
    return f"{fmt}-{precision}"


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
