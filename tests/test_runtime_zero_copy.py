"""The fast paths never alias memory across calls: a result a caller keeps is never overwritten by a later call, and no
caller's input array is read (or written) by a later call, on every runtime and format.

Why: the runtimes reuse buffers of their own between calls to avoid allocation (ONNX Runtime's bound inputs and
outputs, OpenVINO's request tensors, LiteRT's interpreter tensors). A buffer handed to a caller, or a caller's array
kept by the backend, would turn the next request into silent corruption of the previous one.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
from conftest import ModelFiles
from onnx import TensorProto, helper

from agent.runtimes import get_runtime
from agent.runtimes.base import Runtime

PAIRS = [("litert", "mlp.tflite"), ("litert", "mlp_int8.tflite"), ("openvino", "mlp.xml"), ("openvino", "mlp.onnx"), ("onnx", "mlp.onnx")]
IDS = [f"{r}-{f}" for r, f in PAIRS]


def load(runtime: str, path: Path) -> Runtime:
    rt = get_runtime(runtime)()
    rt.load(path)
    rt.warmup()
    return rt


def batch(seed: int, rows: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (rows, 64)).astype(np.float32)


@pytest.mark.parametrize(("runtime", "name"), PAIRS, ids=IDS)
def test_a_kept_result_is_never_overwritten_by_later_calls(models: ModelFiles, runtime: str, name: str) -> None:
    with load(runtime, models.path(name)) as rt:
        kept = []
        for seed in range(4):  # same shape each time: the case where a backend reuses its output buffer
            out = rt.infer({"x": batch(seed)})["y"]
            kept.append((out, out.copy()))
        for rows in (5, 2):  # a shape change rebuilds buffers and bindings; the old results still stand
            rt.infer({"x": batch(9, rows)})
        for out, copy in kept:
            np.testing.assert_array_equal(out, copy)
        results = [o for o, _ in kept]
        assert not any(np.shares_memory(a, b) for i, a in enumerate(results) for b in results[i + 1 :])
        ref = models.mlp.reference(batch(0))
        tol = 0.2 if "int8" in name else 1e-4
        np.testing.assert_allclose(kept[0][0], ref, rtol=tol, atol=tol)


@pytest.mark.parametrize(("runtime", "name"), PAIRS, ids=IDS)
def test_a_callers_input_is_neither_kept_nor_changed(models: ModelFiles, runtime: str, name: str) -> None:
    tol = 0.2 if "int8" in name else 1e-4
    with load(runtime, models.path(name)) as rt:
        x = batch(1)
        before = x.copy()
        first = rt.infer({"x": x})["y"]
        np.testing.assert_array_equal(x, before)  # the runtime wrote nothing into the caller's array
        assert not np.shares_memory(first, x)
        x[:] = 1e6  # the caller reuses its array after the call; a later call must not see it
        second = batch(2)
        got = rt.infer({"x": second})["y"]
        np.testing.assert_allclose(got, models.mlp.reference(second), rtol=tol, atol=tol)
        del x, second  # the caller frees its arrays: the next call must not read freed memory
        gc.collect()
        for seed in (3, 4):
            fresh = batch(seed)
            np.testing.assert_allclose(rt.infer({"x": fresh})["y"], models.mlp.reference(fresh), rtol=tol, atol=tol)
        np.testing.assert_array_equal(rt.infer({"x": before})["y"], first)  # the same input gives the same answer


def test_onnx_outputs_whose_shape_follows_the_values_fall_back_to_plain_calls(tmp_path: Path) -> None:
    """A bound output has the shape learnt on the first call; NonZero's count changes with the values, ONNX Runtime
    refuses the binding, and the runtime answers with a plain call from then on."""
    node = helper.make_node("NonZero", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, -1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "nonzero.onnx"
    path.write_bytes(model.SerializeToString())
    with load("onnx", path) as rt:
        cases = [[1, 0, 2, 0], [1, 0, 2, 0], [1, 1, 1, 0], [0, 0, 0, 5], [3, 0, 0, 3]]
        kept = []
        for values in cases:
            x = np.array(values, np.float32)
            out = rt.infer({"x": x})["y"]
            np.testing.assert_array_equal(out, np.array([np.nonzero(x)[0]]))
            kept.append((out, out.copy()))
        for out, copy in kept:
            np.testing.assert_array_equal(out, copy)
        assert "vary" in rt.describe().details["bound_outputs"]
