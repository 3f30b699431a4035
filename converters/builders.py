"""Write small but real models from numpy weights, without a training framework.

Why this exists: tests, benchmarks and the demo need genuine model files for every
runtime (ONNX protobufs, TFLite flatbuffers, OpenVINO IR) whose exact outputs are
known from numpy. Each builder returns the path it wrote, and ``Mlp.reference``
computes what any correct runtime must answer.

TFLite files are assembled with the flatbuffer object API that ships inside
``ai_edge_litert`` (``schema_py_generated``), so no TensorFlow is needed.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Dense",
    "Mlp",
    "Quantization",
    "random_mlp",
    "write_onnx_mlp",
    "write_onnx_add_mul",
    "write_tflite_mlp",
    "write_tflite_add_mul",
    "write_openvino_ir",
    "add_mul_reference",
]


@dataclass(frozen=True)
class Dense:
    """One fully connected layer: ``y = x @ weight.T + bias`` (weight is [out, in], as TFLite stores it)."""

    weight: np.ndarray
    bias: np.ndarray
    relu: bool = False


@dataclass(frozen=True)
class Mlp:
    """A stack of dense layers with named input and output tensors."""

    layers: list[Dense]
    input_name: str = "x"
    output_name: str = "y"

    @property
    def in_features(self) -> int:
        return int(self.layers[0].weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.layers[-1].weight.shape[0])

    def reference(self, x: np.ndarray) -> np.ndarray:
        """The exact float32 answer, computed with numpy."""
        h = x.astype(np.float32)
        for layer in self.layers:
            h = h @ layer.weight.T.astype(np.float32) + layer.bias.astype(np.float32)
            if layer.relu:
                h = np.maximum(h, 0.0)
        return h


def random_mlp(widths: list[int], seed: int = 0, input_name: str = "x", output_name: str = "y") -> Mlp:
    """An MLP with He-scaled random weights; relu between layers, linear output."""
    rng = np.random.default_rng(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        w = (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        b = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
        layers.append(Dense(w, b, relu=i < len(widths) - 2))
    return Mlp(layers, input_name, output_name)


def add_mul_reference(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """What the two-input, two-output test model answers."""
    return {"sum": (a + b).astype(np.float32), "product": (a * b).astype(np.float32)}


# ---------------------------------------------------------------- ONNX


def _save_onnx(graph: Any, path: Path, opset: int = 17) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # readable by every onnxruntime and OpenVINO release we support
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_onnx_mlp(mlp: Mlp, path: Path, batch: int | None = None) -> Path:
    """An ONNX MLP; ``batch=None`` leaves the batch dimension dynamic (``"N"``)."""
    from onnx import TensorProto, helper, numpy_helper

    dim0: int | str = "N" if batch is None else batch
    nodes, inits = [], []
    current = mlp.input_name
    for i, layer in enumerate(mlp.layers):
        inits += [
            numpy_helper.from_array(layer.weight.astype(np.float32), f"w{i}"),
            numpy_helper.from_array(layer.bias.astype(np.float32), f"b{i}"),
        ]
        out = mlp.output_name if i == len(mlp.layers) - 1 else f"h{i}"
        gemm_out = f"g{i}" if layer.relu else out
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [gemm_out], transB=1))
        if layer.relu:
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(mlp.input_name, TensorProto.FLOAT, [dim0, mlp.in_features])],
        [helper.make_tensor_value_info(mlp.output_name, TensorProto.FLOAT, [dim0, mlp.out_features])],
        initializer=inits,
    )
    return _save_onnx(graph, path)


def write_onnx_add_mul(path: Path, features: int = 4) -> Path:
    """Two named inputs (``a``, ``b``) and two named outputs (``sum``, ``product``), dynamic batch."""
    from onnx import TensorProto, helper

    shape: list[int | str] = ["N", features]
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"], ["product"])],
        "add_mul",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("sum", "product")],
    )
    return _save_onnx(graph, path)


# ---------------------------------------------------------------- OpenVINO IR


def write_openvino_ir(onnx_path: Path, xml_path: Path, compress_to_fp16: bool = False) -> Path:
    """Convert an ONNX file to OpenVINO IR (``.xml`` + ``.bin``), in a child process.

    Why a child: after ``openvino.convert_model`` the calling process's OpenBLAS
    (numpy's scipy-openblas 0.3.31) intermittently deadlocks on its next
    multi-threaded matmul, so the conversion never runs in a process that goes on
    to use numpy.
    """
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    script = "import sys, openvino as ov\nov.save_model(ov.convert_model(sys.argv[1]), sys.argv[2], compress_to_fp16=sys.argv[3] == '1')\n"
    done = subprocess.run(
        [sys.executable, "-c", script, str(onnx_path), str(xml_path), "1" if compress_to_fp16 else "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"OpenVINO conversion of {onnx_path.name} failed: {done.stderr.strip()[-2000:]}")
    return xml_path


# ---------------------------------------------------------------- TFLite


@dataclass(frozen=True)
class Quantization:
    """Affine int8 quantization of one tensor: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int

    def quantize(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.round(x / self.scale) + self.zero_point, -128, 127).astype(np.int8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((q.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)

    @classmethod
    def for_range(cls, lo: float, hi: float) -> Quantization:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / 255.0 or 1.0
        zero_point = int(np.clip(round(-128 - lo / scale), -128, 127))
        return cls(float(scale), zero_point)


@dataclass
class _FlatModel:
    """Accumulates tensors, buffers and operators for one TFLite subgraph."""

    schema: object
    tensors: list[object] = field(default_factory=list)
    buffers: list[object] = field(default_factory=list)
    operators: list[object] = field(default_factory=list)
    opcodes: dict[int, int] = field(default_factory=dict)
    opcode_list: list[object] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.buffers.append(self.schema.BufferT())  # type: ignore[attr-defined]  # buffer 0: the empty sentinel

    def tensor(
        self,
        name: str,
        shape: list[int],
        dtype: int,
        data: np.ndarray | None = None,
        quant: tuple[list[float], list[int]] | None = None,
        dynamic_batch: bool = False,
    ) -> int:
        s = self.schema
        t = s.TensorT()  # type: ignore[attr-defined]
        t.name = name.encode()
        t.shape = list(shape)
        if dynamic_batch:
            t.shapeSignature = [-1, *shape[1:]]
        t.type = dtype
        if data is not None:
            buf = s.BufferT()  # type: ignore[attr-defined]
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        else:
            t.buffer = 0
        if quant is not None:
            q = s.QuantizationParametersT()  # type: ignore[attr-defined]
            q.scale, q.zeroPoint = quant
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(self, code: int, inputs: list[int], outputs: list[int], options_type: int, options: object, version: int = 1) -> None:
        s = self.schema
        if code not in self.opcodes:
            oc = s.OperatorCodeT()  # type: ignore[attr-defined]
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = version
            self.opcode_list.append(oc)
            self.opcodes[code] = len(self.opcode_list) - 1
        o = s.OperatorT()  # type: ignore[attr-defined]
        o.opcodeIndex = self.opcodes[code]
        o.inputs, o.outputs = inputs, outputs
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self.operators.append(o)

    def write(self, path: Path, inputs: list[int], outputs: list[int]) -> Path:
        import flatbuffers

        s = self.schema
        sub = s.SubGraphT()  # type: ignore[attr-defined]
        sub.tensors, sub.inputs, sub.outputs, sub.operators = self.tensors, inputs, outputs, self.operators
        sub.name = b"main"
        model = s.ModelT()  # type: ignore[attr-defined]
        model.version = 3
        model.operatorCodes = self.opcode_list
        model.subgraphs = [sub]
        model.buffers = self.buffers
        model.description = b"edgefleet.converters.builders"
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(builder.Output()))
        return path


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # tflite-runtime does not ship the schema; the tests install ai-edge-litert
        from tflite import schema_py_generated as schema  # type: ignore[import-not-found,no-redef]
    return schema


def write_tflite_mlp(
    mlp: Mlp,
    path: Path,
    int8_calibration: np.ndarray | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """A TFLite MLP of FULLY_CONNECTED ops (fused relu).

    With ``int8_calibration`` (sample inputs) the model is fully int8: int8 input and
    output tensors, per-tensor symmetric int8 weights, int32 biases, ranges taken from
    the calibration data as post-training quantization would.
    """
    s = _schema()
    fm = _FlatModel(s)
    if int8_calibration is None:
        first, last = _tflite_float_layers(s, fm, mlp, dynamic_batch)
    else:
        first, last = _tflite_int8_layers(s, fm, mlp, _calibrate(mlp, int8_calibration), dynamic_batch)
    return fm.write(path, [first], [last])


def _layer_output_name(mlp: Mlp, i: int) -> str:
    """The last layer's output carries the model's output name; the others are ``h0``, ``h1``, ..."""
    return mlp.output_name if i == len(mlp.layers) - 1 else f"h{i}"


def _fully_connected(s: Any, fm: _FlatModel, inputs: list[int], out: int, relu: bool, version: int = 1) -> None:
    """One FULLY_CONNECTED op; int8 kernels need op version 4, float ones run as version 1."""
    fm.op(s.BuiltinOperator.FULLY_CONNECTED, inputs, [out], s.BuiltinOptions.FullyConnectedOptions, _fc_options(s, relu), version=version)


def _tflite_float_layers(s: Any, fm: _FlatModel, mlp: Mlp, dynamic_batch: bool) -> tuple[int, int]:
    """Float32 tensors and one op per layer; returns (input tensor, output tensor)."""
    tt = s.TensorType
    first = cur = fm.tensor(mlp.input_name, [1, mlp.in_features], tt.FLOAT32, dynamic_batch=dynamic_batch)
    for i, layer in enumerate(mlp.layers):
        w = fm.tensor(f"w{i}", list(layer.weight.shape), tt.FLOAT32, layer.weight.astype(np.float32))
        b = fm.tensor(f"b{i}", list(layer.bias.shape), tt.FLOAT32, layer.bias.astype(np.float32))
        out = fm.tensor(_layer_output_name(mlp, i), [1, layer.weight.shape[0]], tt.FLOAT32, dynamic_batch=dynamic_batch)
        _fully_connected(s, fm, [cur, w, b], out, layer.relu)
        cur = out
    return first, cur


def _calibrate(mlp: Mlp, samples: np.ndarray) -> list[Quantization]:
    """One quantization per activation (the input, then each layer's output), from the range the samples reach."""
    acts = [samples.astype(np.float32)]
    h = acts[0]
    for layer in mlp.layers:
        h = h @ layer.weight.T + layer.bias
        if layer.relu:
            h = np.maximum(h, 0.0)
        acts.append(h)
    return [Quantization.for_range(float(a.min()), float(a.max())) for a in acts]


def _tflite_int8_layers(s: Any, fm: _FlatModel, mlp: Mlp, qs: list[Quantization], dynamic_batch: bool) -> tuple[int, int]:
    """Full-integer layers: int8 activations quantized by ``qs``, symmetric int8 weights, int32 biases."""
    tt = s.TensorType
    in_q = ([qs[0].scale], [qs[0].zero_point])
    first = cur = fm.tensor(mlp.input_name, [1, mlp.in_features], tt.INT8, quant=in_q, dynamic_batch=dynamic_batch)
    for i, layer in enumerate(mlp.layers):
        w_scale = float(np.abs(layer.weight).max() / 127.0) or 1.0
        wq = np.clip(np.round(layer.weight / w_scale), -127, 127).astype(np.int8)
        b_scale = qs[i].scale * w_scale
        bq = np.round(layer.bias / b_scale).astype(np.int32)
        w = fm.tensor(f"w{i}", list(wq.shape), tt.INT8, wq, quant=([w_scale], [0]))
        b = fm.tensor(f"b{i}", list(bq.shape), tt.INT32, bq, quant=([b_scale], [0]))
        out_q = ([qs[i + 1].scale], [qs[i + 1].zero_point])
        out = fm.tensor(_layer_output_name(mlp, i), [1, wq.shape[0]], tt.INT8, quant=out_q, dynamic_batch=dynamic_batch)
        _fully_connected(s, fm, [cur, w, b], out, layer.relu, version=4)
        cur = out
    return first, cur


def _fc_options(s: object, relu: bool) -> object:
    opts = s.FullyConnectedOptionsT()  # type: ignore[attr-defined]
    opts.fusedActivationFunction = s.ActivationFunctionType.RELU if relu else s.ActivationFunctionType.NONE  # type: ignore[attr-defined]
    return opts


def write_tflite_add_mul(path: Path, features: int = 4) -> Path:
    """The TFLite twin of :func:`write_onnx_add_mul`, with a dynamic batch dimension."""
    s = _schema()
    fm = _FlatModel(s)
    f32 = s.TensorType.FLOAT32  # type: ignore[attr-defined]
    a = fm.tensor("a", [1, features], f32, dynamic_batch=True)
    b = fm.tensor("b", [1, features], f32, dynamic_batch=True)
    total = fm.tensor("sum", [1, features], f32, dynamic_batch=True)
    product = fm.tensor("product", [1, features], f32, dynamic_batch=True)
    fm.op(s.BuiltinOperator.ADD, [a, b], [total], s.BuiltinOptions.AddOptions, s.AddOptionsT())  # type: ignore[attr-defined]
    fm.op(s.BuiltinOperator.MUL, [a, b], [product], s.BuiltinOptions.MulOptions, s.MulOptionsT())  # type: ignore[attr-defined]
    return fm.write(path, [a, b], [total, product])
