"""Hypothesis against every entry point of a loaded model: hostile requests and hostile model files."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ModelFiles
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.errors import EdgefleetError, InvalidInput, ModelLoadError
from agent.runtimes import get_runtime
from agent.runtimes.base import Runtime

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.int32, np.int64, np.uint8, np.bool_, np.complex64])
# Float elements include NaN and infinity by default.
arrays = hnp.arrays(dtype=dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
values = st.one_of(
    arrays,
    st.none(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.integers(),
    st.floats(),
    st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=3)), max_size=8),
    st.lists(st.lists(st.floats(width=32), min_size=4, max_size=4), min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
requests = st.dictionaries(st.sampled_from(["x", "a", "b", "y", ""]) | st.text(max_size=5), values, max_size=3)


@pytest.fixture(scope="module")
def loaded(models: ModelFiles) -> dict[str, Runtime]:
    out = {}
    for name, file in (("litert", "tiny.tflite"), ("openvino", "tiny.xml"), ("onnx", "tiny.onnx"), ("litert-int8", "mlp_int8.tflite")):
        rt = get_runtime(name.split("-")[0])()
        rt.load(models.path(file))
        out[name] = rt
    return out


@FUZZ
@given(request=requests, which=st.sampled_from(["litert", "openvino", "onnx", "litert-int8"]))
def test_any_request_is_answered_or_refused_with_a_typed_error(loaded: dict[str, Runtime], request: dict[str, object], which: str) -> None:
    rt = loaded[which]
    try:
        out = rt.infer(request)
    except InvalidInput as exc:
        assert exc.code in {"bad_request", "shape_mismatch"} and str(exc)
    else:
        (spec,) = rt.inputs
        x = np.asarray(request[spec.name])
        assert out[rt.outputs[0].name].shape[0] == x.shape[0]
        assert np.isfinite(x.astype(np.float64)).all()
    # Whatever came before, the runtime still answers a good request correctly.
    good = np.ones((1, rt.inputs[0].shape[1]), np.float32)
    assert rt.infer({rt.inputs[0].name: good})[rt.outputs[0].name].shape[0] == 1


@settings(max_examples=40, deadline=None)
@given(blob=st.binary(min_size=0, max_size=4096), which=st.sampled_from(["litert:tflite", "onnx:onnx", "openvino:onnx", "openvino:tflite"]))
def test_random_model_files_never_crash(blob: bytes, which: str) -> None:
    runtime, suffix = which.split(":")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"model.{suffix}"
        p.write_bytes(blob)
        with pytest.raises(ModelLoadError):
            get_runtime(runtime)().load(p)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 0.999), which=st.sampled_from(["litert:tflite", "onnx:onnx", "openvino:onnx"]))
def test_truncated_model_files_are_refused(models: ModelFiles, cut: float, which: str) -> None:
    runtime, suffix = which.split(":")
    data = models.path(f"mlp.{suffix}").read_bytes()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"model.{suffix}"
        p.write_bytes(data[: int(len(data) * cut)])
        try:
            rt = get_runtime(runtime)()
            rt.load(p)
        except ModelLoadError:
            return
        except EdgefleetError as exc:  # any other typed error is a wrong classification
            pytest.fail(f"{type(exc).__name__}: {exc}")
        pytest.fail(f"{runtime} loaded a model truncated to {cut:.1%}")
