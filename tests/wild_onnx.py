"""ONNX models shaped like published ones the project did not train, built with onnx.helper for the tests.

Why: real models bring what the project's MLPs never had — a 0-d int64 input, a recurrent state batched on dim 1,
dynamic dimensions a reflect Pad refuses at length 1, and pads that OpenVINO's ``read_model`` cannot fold (as in the
voice-activity model silero-vad ships). The tests build these themselves; no download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["voice_activity", "voice_inputs"]

HIDDEN = 128


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _computed_pads(pad: int) -> list[onnx.NodeProto]:
    """The pads of a ``(pad, pad)`` reflect padding of the last axis, computed at run time as PyTorch's exporter writes
    them (Shape, ConstantOfShape, a reversing Slice): OpenVINO's ``read_model`` loses the padded tensor's rank on these,
    so the Conv after it refuses to read — until the model is converted with static input shapes."""
    i64 = np.int64
    return [
        _const("pad_pair", np.array([pad, pad], i64)),
        helper.make_node("Shape", ["pad_pair"], ["pad_pair_shape"]),
        _const("idx0", np.array([0], i64)),
        helper.make_node("Gather", ["pad_pair_shape", "idx0"], ["pad_pair_len"], axis=0),
        _const("two", np.array(2, i64)),
        helper.make_node("Mul", ["two", "two"], ["four"]),
        helper.make_node("Sub", ["four", "pad_pair_len"], ["zeros_len"]),
        helper.make_node("Cast", ["pad_pair"], ["pad_pair_i64"], to=TensorProto.INT64),
        helper.make_node("ConstantOfShape", ["zeros_len"], ["zero_pads"], value=numpy_helper.from_array(np.array([0], i64))),
        helper.make_node("Concat", ["pad_pair_i64", "zero_pads"], ["pads_flat"], axis=0),
        _const("pairs", np.array([-1, 2], i64)),
        helper.make_node("Reshape", ["pads_flat", "pairs"], ["pads_2d"]),
        _const("rev_start", np.array([-1], i64)),
        _const("rev_end", np.array([-(2**63) + 1], i64)),
        _const("rev_axes", np.array([0], i64)),
        _const("rev_step", np.array([-1], i64)),
        helper.make_node("Slice", ["pads_2d", "rev_start", "rev_end", "rev_axes", "rev_step"], ["pads_rev"]),
        helper.make_node("Transpose", ["pads_rev"], ["pads_t"], perm=[1, 0]),
        _const("flat", np.array([-1], i64)),
        helper.make_node("Reshape", ["pads_t", "flat"], ["pads_any"]),
        helper.make_node("Cast", ["pads_any"], ["pads"], to=TensorProto.INT64),
    ]


def _rank_by_batch(x: str, state: str, out: str) -> list[onnx.NodeProto]:
    """``out = x`` through an If on the state's batch dimension, as silero-vad's decoder does: the branches differ in rank,
    so while that dimension is dynamic OpenVINO's ``read_model`` cannot know the rank and the Conv after it refuses to read.
    With static input shapes the condition folds and the model converts."""
    then_graph = helper.make_graph(
        [helper.make_node("Identity", [x], ["then_out"])], "then", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Unsqueeze", [x, "axes0"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    return [
        helper.make_node("Shape", [state], ["state_shape"]),
        helper.make_node("Gather", ["state_shape", "axes1"], ["batch_1d"], axis=0),
        helper.make_node("Squeeze", ["batch_1d", "axes0"], ["batch"]),
        helper.make_node("Cast", ["batch"], ["has_rows"], to=TensorProto.BOOL),
        helper.make_node("If", ["has_rows"], [out], then_branch=then_graph, else_branch=else_graph),
    ]


def voice_activity(path: Path, pad: int = 64, seed: int = 0) -> Path:
    """Inputs ``input`` float [batch, samples], ``state`` float [2, batch, 128] (batched on dim 1), ``sr`` int64 0-d;
    outputs ``output`` [batch, 1] and ``stateN`` [2, batch, 128]. The reflect Pad of ``pad`` on the samples axis refuses
    inputs of ``pad`` samples or fewer; ``sr`` scales the state's contribution (used in the graph, not decoration)."""
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.2, (8, 1, 16)).astype(np.float32)
    w_feat = rng.normal(0, 0.2, (8, HIDDEN)).astype(np.float32)
    w_out = rng.normal(0, 0.2, (1, HIDDEN, 1)).astype(np.float32)
    nodes = [
        _const("axes0", np.array([0], np.int64)),
        _const("axes1", np.array([1], np.int64)),
        *_computed_pads(pad),
        helper.make_node("Pad", ["input", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Unsqueeze", ["padded", "axes1"], ["framed"]),
        helper.make_node("Conv", ["framed", "conv_w"], ["conv"], strides=[8]),
        helper.make_node("ReduceMean", ["conv"], ["feat"], axes=[2], keepdims=0),
        helper.make_node("MatMul", ["feat", "w_feat"], ["proj"]),
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        _const("sr_unit", np.array(16000.0, np.float32)),
        helper.make_node("Div", ["sr_f", "sr_unit"], ["sr_scale"]),
        helper.make_node("ReduceMean", ["state"], ["h"], axes=[0], keepdims=0),
        helper.make_node("Mul", ["h", "sr_scale"], ["h_scaled"]),
        helper.make_node("Add", ["proj", "h_scaled"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["z"]),
        helper.make_node("Unsqueeze", ["z", "axes0"], ["z0"]),
        helper.make_node("Neg", ["z0"], ["z1"]),
        helper.make_node("Concat", ["z0", "z1"], ["stateN"], axis=0),
        *_rank_by_batch("z", "state", "z_any"),
        _const("axes2", np.array([2], np.int64)),
        helper.make_node("Unsqueeze", ["z_any", "axes2"], ["z_col"]),
        helper.make_node("Relu", ["z_col"], ["z_relu"]),
        helper.make_node("Conv", ["z_relu", "w_out"], ["logit3"]),
        helper.make_node("Squeeze", ["logit3", "axes2"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "voice_activity",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", HIDDEN]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", HIDDEN]),
        ],
        initializer=[
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(w_feat, "w_feat"),
            numpy_helper.from_array(w_out, "w_out"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def voice_inputs(batch: int = 1, samples: int = 512, sr: int = 16000, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs such a model accepts: audio in [-1, 1], a non-zero state, a 0-d int64 sample rate."""
    rng = np.random.default_rng(seed)
    return {
        "input": rng.uniform(-1, 1, (batch, samples)).astype(np.float32),
        "state": rng.normal(0, 0.5, (2, batch, HIDDEN)).astype(np.float32),
        "sr": np.array(sr, np.int64),
    }
