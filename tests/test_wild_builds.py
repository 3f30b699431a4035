"""`fleet build` on models shaped like published ones: a 0-d input and a state batched on dim 1, float TFLite CNNs
with a transposed convolution (a segmentation mask, a regression head), an op OpenVINO cannot convert.

Every build runs without ``--drop-failing`` on real calibration samples and passes: a variant is kept, or left out
with its reason in ``bundle.json``. Models come from tests/wild_models.py (onnx.helper, Keras -> TFLite).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import wild_models

from agent.bundle import load_bundle, verify_files
from converters.build import build
from converters.errors import BuildError

ALL = ["tflite-fp32", "tflite-int8", "openvino-fp32", "openvino-fp16", "openvino-int8", "onnx-fp32", "onnx-int8"]


def fleet_build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet.cli", "build", *args], capture_output=True, text=True, timeout=1200)


def assert_every_variant_accounted(bundle_dir: Path) -> None:
    """Each variant is kept or recorded as not built, with a reason; kept int8 variants say which layers stayed float."""
    bundle = load_bundle(bundle_dir)
    verify_files(bundle, bundle_dir)
    assert {v.id for v in bundle.variants} | set(bundle.skipped) == set(ALL)
    for vid, why in bundle.skipped.items():
        assert why.state == "skipped" and why.reason, vid
    for v in bundle.variants:
        assert v.parity.passed and set(v.parity.outputs) == {t.name for t in bundle.outputs}, v.id


@pytest.fixture(scope="module")
def keras_tflite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return wild_models.write_keras_tflite(tmp_path_factory.mktemp("keras"))


def test_state_on_dim_1_and_a_scalar_input_through_fleet_build(tmp_path: Path) -> None:
    model = wild_models.write_stateful_onnx(tmp_path / "vad.onnx")
    np.savez(tmp_path / "samples.npz", **wild_models.stateful_samples())
    done = fleet_build(
        str(model), "--name", "vad", "--version", "1", "--out", str(tmp_path / "b"), "--samples", str(tmp_path / "samples.npz")
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    bundle = load_bundle(tmp_path / "b")
    assert [(t.name, t.shape, t.batch_axis) for t in bundle.inputs] == [("audio", [-1, -1], 0), ("state", [2, -1, 8], 1), ("sr", [], None)]
    assert [(t.name, t.batch_axis) for t in bundle.outputs] == [("output", 0), ("stateN", 1)]
    assert_every_variant_accounted(tmp_path / "b")
    assert {"onnx-fp32", "openvino-fp32"} <= {v.id for v in bundle.variants}
    assert "TensorFlow" in bundle.skipped["tflite-int8"].reason
    for v in bundle.variants:
        assert all(o.kind == "values" and o.top1_agreement is None for o in v.parity.outputs.values()), v.id
        assert v.parity.samples == 24
    # the golden samples hold the scalar as 0-d and the state stacked on dim 1; ONNX Runtime agrees with them
    v = bundle.variant("onnx-fp32")
    with np.load(tmp_path / "b" / v.golden) as z:
        ins = {k[3:]: z[k] for k in z.files if k.startswith("in:")}
        outs = {k[4:]: z[k] for k in z.files if k.startswith("out:")}
    assert ins["sr"].shape == () and ins["state"].shape == (2, 4, 8) and outs["stateN"].shape == (2, 4, 8)
    got = ort.InferenceSession(str(model)).run(None, ins)
    np.testing.assert_allclose(got[0], outs["output"], atol=1e-5)
    np.testing.assert_allclose(got[1], outs["stateN"], atol=1e-5)


def test_batch_axis_given_and_bad_scalar_samples(tmp_path: Path) -> None:
    model = wild_models.write_stateful_onnx(tmp_path / "vad.onnx")
    data = wild_models.stateful_samples(count=8, length=8)  # 8 samples of 8: dim 0 and dim 1 of audio both fit
    np.savez(tmp_path / "s.npz", **data)
    report = build(model, "vad", "1", tmp_path / "b", samples=tmp_path / "s.npz", variants=["onnx-fp32"], batch_axes={"state": 1})
    assert report.bundle is not None and [t.batch_axis for t in report.bundle.inputs] == [0, 1, None]
    np.savez(tmp_path / "bad.npz", **(data | {"sr": np.full(8, 16000, np.int64)}))
    with pytest.raises(BuildError, match="'sr' have shape \\[8\\]: the input is 0-d"):
        build(model, "vad", "1", tmp_path / "c", samples=tmp_path / "bad.npz", variants=["onnx-fp32"])
    done = fleet_build(str(model), "--name", "v", "--version", "1", "--out", str(tmp_path / "d"), "--batch-axis", "state")
    assert done.returncode == 2 and "INPUT=AXIS" in done.stderr


def test_segmentation_tflite_with_a_transposed_convolution(keras_tflite: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "images.npy", wild_models.images())
    src = keras_tflite["segmentation"]
    done = fleet_build(str(src), "--name", "seg", "--version", "1", "--out", str(tmp_path / "b"), "--samples", str(tmp_path / "images.npy"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_every_variant_accounted(tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    kept = {v.id for v in bundle.variants}
    assert {"tflite-fp32", "onnx-fp32"} <= kept  # ONNX from a TFLite source through tf2onnx
    assert bundle.outputs[0].shape[1:] == [16, 16, 3]
    for v in bundle.variants:  # a mask is no class score: no top-1, whatever its last axis
        (out,) = v.parity.outputs.values()
        assert out.kind == "values" and out.top1_agreement is None, v.id


def test_regression_head_has_no_top1_and_the_failure_names_the_effective_tolerance(keras_tflite: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "images.npy", wild_models.images())
    src = keras_tflite["regression"]
    report = build(src, "reg", "1", tmp_path / "b", samples=tmp_path / "images.npy")
    assert_every_variant_accounted(tmp_path / "b")
    for v in load_bundle(tmp_path / "b").variants:
        assert v.parity.top1_agreement is None and all(o.kind == "values" for o in v.parity.outputs.values()), v.id
    assert report.bundle is not None
    landmarks = next(t.name for t in report.bundle.outputs if t.shape[1:] == [63])
    done = fleet_build(
        str(src), "--name", "reg", "--version", "1", "--out", str(tmp_path / "c"), "--samples", str(tmp_path / "images.npy"),
        "--variants", "openvino-fp16", "--tolerance", "fp16=1e-7",
    )  # fmt: skip
    assert done.returncode == 1
    message = " ".join(done.stderr.split())
    assert "variants failed: openvino-fp16: output " in message and f"output '{landmarks}': max abs error" in message
    effective = float(message.split(f"output '{landmarks}'")[1].split("(tolerance ")[1].split(" ")[0])
    assert effective > 1e-7 * 50  # scaled by landmarks in pixels, and printed as such
    assert "= 1e-07 x " in message


def test_int8_on_synthetic_samples_only_is_skipped_unless_named(keras_tflite: dict[str, Path], tmp_path: Path) -> None:
    src = keras_tflite["regression"]
    build(src, "reg", "1", tmp_path / "b", variants=None)
    bundle = load_bundle(tmp_path / "b")
    assert bundle.synthetic_samples
    for vid in ("openvino-int8", "onnx-int8"):
        assert bundle.skipped[vid].state == "skipped" and "only synthetic" in bundle.skipped[vid].reason
    report = build(src, "reg", "2", tmp_path / "c", variants=["onnx-int8"], drop_failing=True)
    assert [v.state for v in report.variants] in (["ok"], ["dropped"])  # named: built on synthetic samples


def test_an_op_openvino_cannot_convert_skips_its_variants_with_the_message(tmp_path: Path) -> None:
    model = wild_models.write_ml_scaler_onnx(tmp_path / "scaler.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(-1, 1, (32, 6)).astype(np.float32))
    report = build(model, "sc", "1", tmp_path / "b", samples=tmp_path / "x.npy")
    assert_every_variant_accounted(tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    assert "onnx-fp32" in {v.id for v in bundle.variants}
    for vid in ("openvino-fp32", "openvino-fp16", "openvino-int8"):
        assert "OpenVINO cannot convert scaler.onnx" in bundle.skipped[vid].reason and "Scaler" in bundle.skipped[vid].reason
    assert {v.id: v.state for v in report.variants}["openvino-fp32"] == "skipped"
