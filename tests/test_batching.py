"""Micro-batching under hostile mixes of requests: each request gets its own answer or its own typed error, never another
request's rows, and one request that breaks the merged call costs only itself.

Real ONNX models built here with onnx.helper, served through ``Serving`` with the real runtime; the replies are read as a
client reads them. ``Serving._serve`` is called with the batch directly: which requests meet in one batch is then certain.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from agent.runtimes import get_runtime
from agent.runtimes.tensors import TensorSpec
from agent.serve import batching
from agent.serve.host import ModelHost, ServingModel
from agent.serve.serving import Serving, _Item
from agent.wire.inference import decode_reply, encode_request


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def doubler_with_constant(path: Path) -> Path:
    """``y = 2x`` per row, and ``c``: a fixed [4] vector whatever the batch (a per-model constant, not per row)."""
    nodes = [
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32), "two")),
        helper.make_node("Mul", ["x", "two"], ["y"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.arange(4, dtype=np.float32), "c")),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]), helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])],
    )
    return _save(graph, path)


def lookup(path: Path) -> Path:
    """Rows of a 3-row table by index: an index past the table makes onnxruntime fail the whole call."""
    table = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0)],
        "g",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 2])],
        initializer=[table],
    )
    return _save(graph, path)


class Served:
    """A ``Serving`` over one real model; ``batch`` serves requests as one micro-batch and returns each one's reply (binary
    payloads: an empty array keeps its shape)."""

    def __init__(self, model: Path) -> None:
        rt = get_runtime("onnx")()
        rt.load(model)
        self.host = ModelHost()
        self.host.swap(ServingModel("m", "1", "onnx-fp32", "0" * 64, rt))
        self.sent: list[bytes] = []
        self.serving = Serving("dev-1", self.host, lambda topic, payload, qos: self.sent.append(payload), micro_batch=8)

    def batch(self, *requests: dict[str, np.ndarray]) -> dict[str, object]:
        self.sent.clear()
        items = [_Item("m", encode_request(f"r{i}", dict(r), binary=True), time.monotonic(), 0) for i, r in enumerate(requests)]
        self.serving._serve(items)
        replies = {r.request_id: r for r in map(decode_reply, self.sent)}
        assert len(replies) == len(requests)
        return replies  # type: ignore[return-value]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batching")


def test_an_output_with_a_fixed_size_is_never_cut_into_rows_even_when_the_size_matches(models: Path) -> None:
    served = Served(doubler_with_constant(models / "const.onnx"))
    a, b = np.ones((2, 2), np.float32), np.full((2, 2), 3.0, np.float32)  # 2 + 2 rows: the fixed output's size, 4
    replies = served.batch({"x": a}, {"x": b})
    for rid, x in (("r0", a), ("r1", b)):
        reply = replies[rid]
        assert not reply.error_code, reply.error_message  # type: ignore[attr-defined]
        np.testing.assert_array_equal(reply.outputs["y"], 2 * x)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(reply.outputs["c"], np.arange(4, dtype=np.float32))  # type: ignore[attr-defined]


def test_a_request_that_breaks_the_merged_call_costs_only_itself(models: Path) -> None:
    served = Served(lookup(models / "lookup.onnx"))
    replies = served.batch({"idx": np.array([0, 2])}, {"idx": np.array([99])}, {"idx": np.array([1])})
    np.testing.assert_array_equal(replies["r0"].outputs["rows"], [[0, 1], [4, 5]])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(replies["r2"].outputs["rows"], [[2, 3]])  # type: ignore[attr-defined]
    assert replies["r1"].error_code == "internal"  # type: ignore[attr-defined]


def test_an_empty_request_is_refused_as_it_would_be_alone_not_answered_from_a_merged_call(models: Path) -> None:
    served = Served(doubler_with_constant(models / "const2.onnx"))
    replies = served.batch({"x": np.zeros((0, 2), np.float32)}, {"x": np.ones((3, 2), np.float32)})
    assert replies["r0"].error_code == "bad_request" and "empty" in replies["r0"].error_message  # type: ignore[attr-defined]
    np.testing.assert_array_equal(replies["r1"].outputs["y"], np.full((3, 2), 2.0))  # type: ignore[attr-defined]


def test_requests_are_not_stacked_on_a_static_batch_dimension() -> None:
    """Two halves of a static batch of 4 are each refused alone: merged they must not pass as one valid input."""
    specs = {"x": TensorSpec("x", (4, 2), np.dtype(np.float32), batch_axis=0)}
    half = np.zeros((2, 2), np.float32)
    assert batching.merge(specs, [{"x": half}, {"x": half}]) is None
    out_specs = {"y": TensorSpec("y", (4, 2), np.dtype(np.float32), batch_axis=0)}
    with pytest.raises(ValueError):
        batching.split(out_specs, {"y": np.zeros((4, 2), np.float32)}, [2, 2])


def test_requests_in_other_number_dtypes_share_one_call_and_the_shadow_sees_them_as_sent(models: Path) -> None:
    """JSON floats decode as float64, whole numbers as int64, a binary request is float32: for a float model each alone
    is converted to float32, so together they share a call (they did before the conversion moved into the model host),
    and ``on_served`` gets the merged values as sent, not rounded to the model's dtype."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    served = Served(_save(helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "g", [x], [y], [two]), models / "mixed.onnx"))
    seen: list[Mapping[str, object]] = []
    served.host.on_served = lambda m, inputs, out, took: seen.append(inputs)
    calls = served.host.get("m").served  # type: ignore[union-attr]
    as_json_floats = np.array([[0.1, 1e-9]], np.float64)
    replies = served.batch({"x": as_json_floats}, {"x": np.array([[5, 6]], np.int64)}, {"x": np.full((2, 2), 0.5, np.float32)})
    assert served.host.get("m").served == calls + 1  # type: ignore[union-attr]
    np.testing.assert_array_equal(replies["r0"].outputs["y"], 2 * as_json_floats.astype(np.float32))  # type: ignore[attr-defined]
    np.testing.assert_array_equal(replies["r1"].outputs["y"], [[10.0, 12.0]])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(replies["r2"].outputs["y"], np.ones((2, 2)))  # type: ignore[attr-defined]
    merged = seen[0]["x"]
    assert isinstance(merged, np.ndarray) and merged.dtype == np.float64 and merged[0, 1] == 1e-9


def test_a_quantized_input_never_merges_integers_with_floats() -> None:
    """Integers sent to a quantized input are taken as already quantized, floats are quantized: joined, the integers
    would become floats and be quantized again."""
    specs = {"x": TensorSpec("x", (-1, 2), np.dtype(np.int8), quantization=(0.5, 0), batch_axis=0)}
    assert batching.merge(specs, [{"x": np.ones((1, 2), np.int64)}, {"x": np.ones((1, 2), np.float32)}]) is None
    floats = {"x": TensorSpec("x", (-1, 2), np.dtype(np.float32), batch_axis=0)}
    assert batching.merge(floats, [{"x": np.ones((1, 2), np.int64)}, {"x": np.array([["a", "b"]])}]) is None  # not numbers


_SPECS = {
    "x": TensorSpec("x", (-1, 3), np.dtype(np.float32), batch_axis=0),
    "state": TensorSpec("state", (2, -1, 4), np.dtype(np.float32), batch_axis=1),
    "sr": TensorSpec("sr", (), np.dtype(np.int64), batch_axis=None),
}


@st.composite
def _request(draw: st.DrawFn) -> dict[str, np.ndarray]:
    rows = draw(st.integers(0, 3))
    state_rows = draw(st.sampled_from([rows, rows, rows + 1]))
    width = draw(st.sampled_from([3, 3, 3, 5]))
    sr = draw(st.sampled_from([16000, 16000, 8000]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(rows, width)).astype(np.float32),
        "state": rng.normal(size=(2, state_rows, 4)).astype(np.float32),
        "sr": np.array(sr, np.int64),
    }


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(_request(), min_size=2, max_size=5))
def test_merge_then_split_gives_each_request_exactly_its_own_rows(requests: list[dict[str, np.ndarray]]) -> None:
    merged = batching.merge(_SPECS, requests)
    if merged is None:
        return
    joined, rows = merged
    for r in requests:  # merged only when each request agrees with itself on its rows, has some, and all agree off the axis
        assert r["x"].shape[0] == r["state"].shape[1] > 0
        assert r["sr"] == requests[0]["sr"] and r["x"].shape[1] == requests[0]["x"].shape[1]
    outputs = {"y": joined["x"] * 2, "stateN": joined["state"] + 1}
    out_specs = {
        "y": TensorSpec("y", (-1, 3), np.dtype(np.float32), batch_axis=0),
        "stateN": TensorSpec("stateN", (2, -1, 4), np.dtype(np.float32), batch_axis=1),
    }
    for r, part in zip(requests, batching.split(out_specs, outputs, rows)):
        np.testing.assert_array_equal(part["y"], r["x"] * 2)
        np.testing.assert_array_equal(part["stateN"], r["state"] + 1)
