"""Models shaped like published ones, built with the real toolchains for the wild-build tests.

Why a helper module: the tests need models no one here trained the way a user's arrive — a voice-activity-like ONNX
with a recurrent state batched on dim 1, a 0-d int64 sample rate, dynamic dims and a reflect Pad that refuses
length-1 inputs; float TFLite files exported from Keras CNNs with a transposed convolution (segmentation mask
``[1, H, W, C]``) and a regression head (landmarks); and an ONNX model with an op ONNX Runtime runs but OpenVINO
cannot convert. The Keras models are built in a child process: TensorFlow is heavy and shares thread pools with numpy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

HIDDEN = 8


def write_stateful_onnx(path: Path, seed: int = 0) -> Path:
    """``audio`` [B, T], ``state`` [2, B, 8] (batched on dim 1), ``sr`` int64 0-d -> ``output`` [B, 1], ``stateN`` [2, B, 8].

    A reflect Pad of 2 on the time axis refuses T < 3, as silero-vad's does for short chunks; ``sr`` scales the features.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((HIDDEN, 1, 5)) * 0.5).astype(np.float32), "conv_w"),
        numpy_helper.from_array((rng.standard_normal(HIDDEN) * 0.1).astype(np.float32), "conv_b"),
        numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) * 0.4).astype(np.float32), "rec_w"),
        numpy_helper.from_array((rng.standard_normal((HIDDEN, 1)) * 0.5).astype(np.float32), "out_w"),
        numpy_helper.from_array(np.array([0, 0, 2, 0, 0, 2], np.int64), "pads"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array(16000.0, np.float32), "sr_ref"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["audio", "axis1"], ["x"]),  # [B, 1, T]
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),  # [B, 1, T + 4]
        helper.make_node("Conv", ["padded", "conv_w", "conv_b"], ["conv"], name="conv"),  # [B, H, T]
        helper.make_node("ReduceMean", ["conv"], ["feat"], axes=[2], keepdims=0),  # [B, H]
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["sr_f", "sr_ref"], ["sr_scale"]),
        helper.make_node("Mul", ["feat", "sr_scale"], ["scaled"]),
        helper.make_node("Unsqueeze", ["scaled", "axis0"], ["scaled3"]),  # [1, B, H]
        helper.make_node("MatMul", ["state", "rec_w"], ["rec"], name="recurrent"),  # [2, B, H]
        helper.make_node("Add", ["rec", "scaled3"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["stateN"]),
        helper.make_node("ReduceMean", ["stateN"], ["pooled"], axes=[0], keepdims=0),  # [B, H]
        helper.make_node("MatMul", ["pooled", "out_w"], ["logit"], name="head"),  # [B, 1]
        helper.make_node("Sigmoid", ["logit"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "stateful",
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", "T"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", HIDDEN]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "B", HIDDEN]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def stateful_samples(count: int = 24, length: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    """Audio-like chunks (sines plus noise), states in (-1, 1) stacked on dim 1, and a 0-d sample rate."""
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float32) / 16000.0
    freq = rng.uniform(100, 2000, (count, 1)).astype(np.float32)
    audio = (0.5 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal((count, length))).astype(np.float32)
    state = np.tanh(rng.standard_normal((2, count, HIDDEN))).astype(np.float32)
    return {"audio": audio, "state": state, "sr": np.array(16000, np.int64)}


def write_ml_scaler_onnx(path: Path) -> Path:
    """A Conv net ending in ``ai.onnx.ml.Scaler``: ONNX Runtime runs it, OpenVINO's converter does not know the op."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1, name="dense"),
            helper.make_node("Scaler", ["h"], ["y"], domain="ai.onnx.ml", offset=[0.5], scale=[2.0]),
        ],
        "scaler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((3, 6)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


KERAS_SCRIPT = """
import sys
import numpy as np
import keras
import tensorflow as tf

root = sys.argv[1]
keras.utils.set_random_seed(0)

def tflite(model, name):
    model.export(f"{root}/{name}_saved")
    data = tf.lite.TFLiteConverter.from_saved_model(f"{root}/{name}_saved").convert()
    open(f"{root}/{name}.tflite", "wb").write(data)

# segmentation: a small encoder-decoder whose decoder is a transposed convolution with bias -> mask [1, 16, 16, 3]
img = keras.Input((16, 16, 3), batch_size=1, name="image")
x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(img)
x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
x = keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same", use_bias=True, bias_initializer="random_normal")(x)
mask = keras.layers.Softmax(axis=-1, name="mask")(x)
tflite(keras.Model(img, mask), "segmentation")

# regression: landmarks [1, 63] (21 points x 3) in pixels and a presence score [1, 1]
img = keras.Input((16, 16, 3), batch_size=1, name="image")
x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(img)
x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
x = keras.layers.Flatten()(x)
landmarks = keras.layers.Dense(63, name="landmarks")(x)
landmarks = keras.layers.Rescaling(64.0, offset=80.0)(landmarks)
score = keras.layers.Dense(1, activation="sigmoid", name="score")(x)
tflite(keras.Model(img, [landmarks, score]), "regression")
"""


def write_keras_tflite(root: Path) -> dict[str, Path]:
    """``segmentation.tflite`` and ``regression.tflite``: float TFLite from Keras CNNs (built in a child)."""
    done = subprocess.run([sys.executable, "-c", KERAS_SCRIPT, str(root)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return {name: root / f"{name}.tflite" for name in ("segmentation", "regression")}


def images(count: int = 32, seed: int = 3) -> np.ndarray:
    """Image-like calibration samples [count, 16, 16, 3] in [0, 1]: smooth gradients and blobs, not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float32) / 15.0
    out = np.empty((count, 16, 16, 3), np.float32)
    for i in range(count):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        for c in range(3):
            a, b = rng.uniform(-0.5, 0.5, 2)
            out[i, :, :, c] = np.clip(0.5 + a * yy + b * xx + rng.uniform(0, 0.5) * blob, 0, 1)
    return out
