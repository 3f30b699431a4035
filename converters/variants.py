"""One producer per variant: how to make it from a source, or why it cannot be made here.

A variant is named by its format and precision (``agent.runtimes.formats``), the
names the bundle, the runtimes' preferences and the controller use. A converter
that cannot convert (an op it does not know, a custom op, a shape it cannot infer)
raises ``SkipVariant`` with the converter's own message: that variant is left out
with its reason, the build goes on. int8 producers take a ``Job.float_layers``
count: the build's retry asks for that many layers nearest the output that misses
parity to be kept in float (NNCF's ignored scope, onnxruntime's ``nodes_to_exclude``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtimes.formats import ModelFormat, Precision, variant_id
from converters import samples as sample_io
from converters.errors import SkipVariant
from converters.source import Source

__all__ = ["KINDS", "Job", "Produced", "VariantKind", "converter_message"]

# Layers whose weights int8 quantizes: the ones worth keeping in float when an output misses parity.
ONNX_WEIGHTED = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


@dataclass
class Job:
    """What one producer call is asked for: the source, a work directory, the samples, and (int8 retries) how many
    layers feeding ``output`` to keep in float."""

    src: Source
    out: Path
    samples: dict[str, np.ndarray]
    float_layers: int = 0
    output: str | None = None


@dataclass
class Produced:
    """A producer's result: the files (main file first), shapes it fixed, layers it kept in float."""

    files: list[Path]
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    float_layers: list[str] = field(default_factory=list)
    weighted_layers: int = 0  # how many layers int8 could quantize: a retry never keeps them all in float


Producer = Callable[[Job], Produced]


@dataclass(frozen=True)
class VariantKind:
    format: ModelFormat
    precision: Precision
    produce: Producer
    keeps_float: bool = False  # an int8 producer that can keep layers in float (retries when parity fails)

    @property
    def id(self) -> str:
        return variant_id(self.format, self.precision)


def _installed(module: str) -> bool:
    """Whether an optional converter dependency can be imported (without importing it: TensorFlow is heavy)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def converter_message(text: str, limit: int = 600) -> str:
    """The lines of a converter's error that say what failed, without traceback frames."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("  File ", "Traceback", "    "))]
    lines = [ln for ln in lines if not set(ln) <= set("^~ ")]
    detail = [ln for ln in lines if ln.startswith("-- ")][:1]
    picked = detail + [ln for ln in lines[-2:] if ln not in detail]
    return " ".join(picked)[-limit:] or "(no output)"


# ---------------------------------------------------------------- ONNX


def _rename_io(model: object, inputs: list[str], outputs: list[str]) -> None:
    """Give a converted ONNX graph the source's tensor names (tf2onnx keeps ``serving_default_x:0``), by position
    where the names do not already match."""
    graph = model.graph  # type: ignore[attr-defined]
    renames: dict[str, str] = {}
    for values, want in ((graph.input, inputs), (graph.output, outputs)):
        if sorted(v.name for v in values) != sorted(want) and len(values) == len(want):
            renames |= {v.name: w for v, w in zip(values, want)}
    for v in [*graph.input, *graph.output]:
        v.name = renames.get(v.name, v.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def _onnx_of(job: Job) -> Path:
    """The source as ONNX: the file itself, or tf2onnx's conversion of the TFLite (once per build, kept in scratch)."""
    src = job.src
    if src.format == "onnx":
        return src.path
    if src.format != "tflite" and not src.is_tensorflow:
        raise SkipVariant(f"no {src.format} -> ONNX converter")
    if not _installed("tf2onnx"):
        raise SkipVariant(f"no {src.format} -> ONNX converter: tf2onnx is not installed (extra: convert)")
    scratch = src.scratch()
    dest = scratch / "source.onnx"
    if dest.exists():
        return dest
    tflite = src.path if src.format == "tflite" else _tflite_from_tensorflow(Job(src, scratch, job.samples), "fp32").files[0]
    done = subprocess.run(
        [sys.executable, "-m", "tf2onnx.convert", "--tflite", str(tflite), "--output", str(scratch / "raw.onnx"), "--opset", "17"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise SkipVariant(f"tf2onnx cannot convert {src.path.name}: {converter_message(done.stderr)}")
    import onnx

    model = onnx.load(str(scratch / "raw.onnx"))
    _rename_io(model, [t.name for t in src.inputs], [t.name for t in src.outputs])
    onnx.save(model, str(dest))
    return dest


def _onnx_fp32(job: Job) -> Produced:
    dest = job.out / "model.onnx"
    shutil.copyfile(_onnx_of(job), dest)
    return Produced([dest])


def feeding_layers(graph: object, output: str | None, kinds: frozenset[str]) -> list[str]:
    """Weighted layers that feed ``output`` (every output when None), nearest first: the first to keep in float."""
    nodes = list(graph.node)  # type: ignore[attr-defined]
    producer = {o: n for n in nodes for o in n.output}
    frontier = [output] if output else [o.name for o in graph.output]  # type: ignore[attr-defined]
    seen: set[str] = set()
    order: list[str] = []
    while frontier:
        nxt = []
        for tensor in frontier:
            node = producer.get(tensor)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in kinds:
                order.append(node.name)
            nxt.extend(node.input)
        frontier = nxt
    return order


def _calibration_items(samples: dict[str, np.ndarray], src: Source) -> list[dict[str, np.ndarray]]:
    """One sample per item, cut along each input's batch axis (0-d inputs whole)."""
    return sample_io.batches(samples, src.inputs, 1)


def _onnx_int8(job: Job) -> Produced:
    if job.src.is_quantized:
        raise SkipVariant("the source TFLite is int8 already; it becomes the tflite-int8 variant")
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(_onnx_of(job)))
    for i, node in enumerate(model.graph.node):  # nodes_to_exclude names nodes: every node needs one
        node.name = node.name or f"{node.op_type}_{i}"
    named = job.out / ".named.onnx"
    onnx.save(model, str(named))
    exclude = feeding_layers(model.graph, job.output, ONNX_WEIGHTED)[: job.float_layers] if job.float_layers else []
    weighted = sum(n.op_type in ONNX_WEIGHTED for n in model.graph.node)
    items = iter(_calibration_items(job.samples, job.src))

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(items, None)

    dest = job.out / "model_int8.onnx"
    try:
        quantize_static(
            str(named),
            str(dest),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            # 7-bit weights: x86 CPUs without VNNI (AVX2, most AVX-512) multiply int8 with VPMADDUBSW, whose 16-bit
            # pair sums saturate with full-range weights — measured: max abs error 0.45 against 0.29 allowed on an
            # AVX2 EPYC, where the same model passed on an AVX-512 VNNI one; onnxruntime's advice for such CPUs
            reduce_range=True,
            nodes_to_exclude=exclude,
        )
    except Exception as exc:  # onnxruntime's quantizer refusing an op or a graph: this variant cannot be made
        raise SkipVariant(f"onnxruntime cannot quantize {job.src.path.name}: {type(exc).__name__}: {converter_message(str(exc))}") from exc
    finally:
        named.unlink(missing_ok=True)
    return Produced([dest], float_layers=exclude, weighted_layers=weighted)


# ---------------------------------------------------------------- OpenVINO


def _static_shapes(job: Job) -> dict[str, list[int]]:
    """The shapes of one sample per input (0-d inputs as they are): what a converter that cannot take dynamic shapes gets."""
    one = sample_io.take(job.samples, job.src.inputs, 0, 1)
    return {t.name: list(one[t.name].shape) for t in job.src.inputs}


def _openvino_child(job: Job, dest: Path, precision: str, shapes: dict[str, list[int]] | None) -> dict[str, Any]:
    """Run the conversion in ``converters._openvino_child``; its result, or ``SkipVariant`` with OpenVINO's message."""
    spec = {
        "source": str(job.src.path),
        "out": str(dest),
        "precision": precision,
        "inputs": [t.name for t in job.src.inputs],
        "outputs": [t.name for t in job.src.outputs],
        "axes": {t.name: t.batch_axis for t in job.src.inputs},
        "shapes": [shapes[t.name] for t in job.src.inputs] if shapes else None,
        "float_layers": job.float_layers,
        "output": job.output,
        "samples": None,
    }
    if precision == "int8":
        np.savez(job.out / ".calibration.npz", **job.samples)  # type: ignore[arg-type]
        spec["samples"] = str(job.out / ".calibration.npz")
    (job.out / ".job.json").write_text(json.dumps(spec))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "converters._openvino_child", str(job.out / ".job.json")], capture_output=True, text=True, timeout=1800
        )
    finally:
        (job.out / ".calibration.npz").unlink(missing_ok=True)
    if done.returncode != 0:
        raise SkipVariant(f"OpenVINO cannot convert {job.src.path.name}: {converter_message(done.stderr)}")
    result: dict[str, Any] = json.loads((job.out / ".job.json.result").read_text())
    return result


def _openvino(precision: str) -> Producer:
    def produce(job: Job) -> Produced:
        if precision == "int8" and not _installed("nncf"):
            raise SkipVariant("nncf is not installed (extra: convert)")
        dest = job.out / f"model_openvino_{precision}.xml"
        shapes: dict[str, list[int]] = {}
        try:
            result = _openvino_child(job, dest, precision, None)
        except SkipVariant:
            if job.src.static_shapes:
                raise
            shapes = _static_shapes(job)  # e.g. a dynamic rank inside the graph: fixed shapes let OpenVINO infer it
            result = _openvino_child(job, dest, precision, shapes)
        files = [dest, dest.with_suffix(".bin")]
        return Produced(files, input_shapes=shapes, float_layers=result["float_layers"], weighted_layers=result["weighted_layers"])

    return produce


# ---------------------------------------------------------------- TFLite


def _tflite_from_tensorflow(job: Job, precision: str) -> Produced:
    from converters.source import tensorflow_child

    dest = job.out / ("model.tflite" if precision == "fp32" else "model_int8.tflite")
    args = ["tflite", str(job.src.path), str(dest), precision]
    if precision == "int8":
        np.savez(job.out / ".calibration.npz", **job.samples)  # type: ignore[arg-type]
        args.append(str(job.out / ".calibration.npz"))
    try:
        tensorflow_child(*args)
    finally:
        (job.out / ".calibration.npz").unlink(missing_ok=True)
    return Produced([dest])


def _tflite_fp32(job: Job) -> Produced:
    src = job.src
    if src.is_tensorflow:
        return _tflite_from_tensorflow(job, "fp32")
    if src.format != "tflite":
        raise SkipVariant("ONNX -> TFLite needs a TensorFlow-based converter (onnx2tf), which edgefleet does not ship")
    if src.is_quantized:
        raise SkipVariant("the source TFLite is int8; it becomes the tflite-int8 variant")
    dest = job.out / "model.tflite"
    shutil.copyfile(src.path, dest)
    return Produced([dest])


def _tflite_int8(job: Job) -> Produced:
    src = job.src
    if src.is_tensorflow:
        return _tflite_from_tensorflow(job, "int8")
    if src.format == "tflite" and src.is_quantized:
        dest = job.out / "model_int8.tflite"
        shutil.copyfile(src.path, dest)
        return Produced([dest])
    raise SkipVariant("full-integer TFLite needs the TensorFlow model (Keras or SavedModel source)")


KINDS: dict[str, VariantKind] = {
    k.id: k
    for k in (
        VariantKind("tflite", "fp32", _tflite_fp32),
        VariantKind("tflite", "int8", _tflite_int8),
        VariantKind("openvino", "fp32", _openvino("fp32")),
        VariantKind("openvino", "fp16", _openvino("fp16")),
        VariantKind("openvino", "int8", _openvino("int8"), keeps_float=True),
        VariantKind("onnx", "fp32", _onnx_fp32),
        VariantKind("onnx", "int8", _onnx_int8, keeps_float=True),
    )
}
