"""`fleet build`: real conversions, parity against independent numpy references, atomic output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ModelFiles

from agent.bundle import BundleError, load_bundle, verify_files
from agent.hardware import detect
from agent.runtimes import probe_all, runtime_for_format
from agent.selection import choose
from converters import builders
from converters.build import build
from converters.errors import BuildError, SamplesError, SourceError

FAST = ["onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-fp16", "openvino-int8"]


@pytest.fixture(scope="module")
def onnx_bundle(models: ModelFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "mlp"
    np.save(out.parent / "samples.npy", models.calibration)
    # NNCF's int8 of this random 3-layer MLP is ~0.45 off at worst (top-1 ~91%): allowed explicitly, as a user would.
    build(
        models.path("mlp.onnx"),
        "mlp",
        "1.0.0",
        out,
        samples=out.parent / "samples.npy",
        variants=FAST,
        archive=True,
        tolerances={"openvino-int8": 0.3},
    )
    return out


def test_bundle_from_onnx_passes_parity_checked_independently(onnx_bundle: Path, models: ModelFiles) -> None:
    bundle = load_bundle(onnx_bundle)
    verify_files(bundle, onnx_bundle)
    assert [v.id for v in bundle.variants] == FAST
    assert bundle.synthetic_samples is False and bundle.source_format == "onnx"
    assert [(t.name, t.shape, t.dtype) for t in bundle.inputs] == [("x", [-1, 64], "float32")]
    x = models.calibration
    truth = models.mlp.reference(x)  # numpy, independent of every runtime
    for v in bundle.variants:
        with runtime_for_format(v.format)() as rt:
            rt.load(onnx_bundle / v.file)
            got = rt.infer({"x": x})["y"]
        err = float(np.abs(got - truth).max())
        assert abs(err - v.parity.max_abs_error) <= 1e-4 + 0.01 * err, v.id  # the report tells the truth
        assert v.parity.passed and v.parity.samples == len(x)
        assert v.parity.top1_agreement is not None and v.parity.top1_agreement >= 0.9
        assert v.min_runtime_version[runtime_for_format(v.format).name] == probe_all()[runtime_for_format(v.format).name].version
    assert bundle.variants[0].parity.max_abs_error < 1e-5  # fp32 copy
    assert 0 < bundle.variants[1].parity.max_abs_error < 0.5  # int8 is close, not exact
    assert 0 < bundle.variants[4].parity.max_abs_error < 1.0 and bundle.variants[4].parity.atol == 0.3
    assert bundle.skipped == {}  # every requested variant has a path from ONNX
    for v in bundle.variants:
        assert v.golden in os.listdir(onnx_bundle)


def test_agent_selects_from_the_bundle_with_its_golden_samples(onnx_bundle: Path) -> None:
    bundle = load_bundle(onnx_bundle)
    variants = bundle.model_variants(onnx_bundle)
    sel, _ = choose(detect(), probe_all(), variants)
    v = bundle.variant_for(sel.candidate.variant.path)
    golden = bundle.golden_samples(onnx_bundle, v)
    for g in golden:
        g.check(sel.runtime.infer(g.inputs))
    sel.runtime.close()


def test_archive_holds_the_bundle(onnx_bundle: Path) -> None:
    with tarfile.open(onnx_bundle.parent / "mlp.tar.gz") as tar:
        names = set(tar.getnames())
    assert names == set(os.listdir(onnx_bundle))


def test_tflite_sources(models: ModelFiles, tmp_path: Path) -> None:
    report = build(models.path("mlp.tflite"), "mlp", "2", tmp_path / "fp32", variants=["tflite-fp32", "onnx-fp32", "openvino-fp32"])
    states = {v.id: v.state for v in report.variants}
    assert states == {"tflite-fp32": "ok", "onnx-fp32": "ok", "openvino-fp32": "ok"}  # ONNX from TFLite through tf2onnx
    assert load_bundle(tmp_path / "fp32").variant("onnx-fp32").parity.max_abs_error < 1e-4
    assert report.synthetic_samples
    report = build(
        models.path("mlp_int8.tflite"), "mlp", "3", tmp_path / "int8", variants=["tflite-fp32", "tflite-int8"], tolerances={"int8": 0.5}
    )
    assert {v.id: v.state for v in report.variants} == {"tflite-fp32": "skipped", "tflite-int8": "ok"}
    b = load_bundle(tmp_path / "int8")
    assert b.inputs[0].quantization is not None and b.variants[0].precision == "int8"


def test_failing_variant_fails_the_build_or_is_dropped(models: ModelFiles, tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(BuildError, match=r"onnx-int8: output 'y': max abs error \S+ \(tolerance ") as info:
        build(models.path("mlp.onnx"), "m", "1", out, variants=["onnx-fp32", "onnx-int8"], tolerances={"onnx-int8": 1e-7})
    assert not out.exists() and not list(tmp_path.glob(".b.building-*"))
    report = info.value.report
    assert [v.state for v in report.variants] == ["ok", "failed"]  # type: ignore[attr-defined]
    report = build(
        models.path("mlp.onnx"), "m", "1", out, variants=["onnx-fp32", "onnx-int8"], tolerances={"int8": 1e-7}, drop_failing=True
    )
    assert [v.id for v in load_bundle(out).variants] == ["onnx-fp32"]
    assert [v.state for v in report.variants] == ["ok", "dropped"]


@pytest.mark.parametrize(
    ("content", "suffix", "error", "message"),
    [
        (b"", ".onnx", SourceError, "cannot load"),
        (b"garbage" * 100, ".onnx", SourceError, "cannot load"),
        (None, ".onnx", SourceError, "cannot load"),  # truncated real model
        (b"x", ".pt", SourceError, "unsupported source"),
        (b"x", ".keras", SourceError, "TensorFlow prepare failed"),
    ],
)
def test_bad_sources(models: ModelFiles, tmp_path: Path, content: bytes | None, suffix: str, error: type, message: str) -> None:
    src = tmp_path / f"model{suffix}"
    src.write_bytes(models.path("mlp.onnx").read_bytes()[:300] if content is None else content)
    with pytest.raises(error, match=message):
        build(src, "m", "1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_samples_and_options(models: ModelFiles, tmp_path: Path) -> None:
    src = models.path("add_mul.onnx")
    np.savez(tmp_path / "wrong_names.npz", a=np.ones((4, 4), np.float32), c=np.ones((4, 4), np.float32))
    np.savez(tmp_path / "wrong_shape.npz", a=np.ones((4, 3), np.float32), b=np.ones((4, 3), np.float32))
    np.savez(tmp_path / "counts.npz", a=np.ones((4, 4), np.float32), b=np.ones((5, 4), np.float32))
    np.savez(tmp_path / "nan.npz", a=np.full((4, 4), np.nan, np.float32), b=np.ones((4, 4), np.float32))
    np.save(tmp_path / "one.npy", np.ones((4, 4), np.float32))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04junk")
    cases = {
        "wrong_names.npz": "the model's inputs are",
        "wrong_shape.npz": "have shape",
        "counts.npz": "different sample counts",
        "nan.npz": "NaN",
        "one.npy": "give samples as .npz",
        "junk.npz": "cannot read samples",
    }
    for name, message in cases.items():
        with pytest.raises(SamplesError, match=message):
            build(src, "m", "1", tmp_path / "out", samples=tmp_path / name)
    with pytest.raises(BuildError, match="unknown variant 'onnx-int4'"):
        build(src, "m", "1", tmp_path / "out", variants=["onnx-int4"])
    with pytest.raises(BuildError, match=r"name '\.\./etc'"):
        build(src, "../etc", "1", tmp_path / "out")
    with pytest.raises(BuildError, match="version 'v 1'"):
        build(src, "m", "v 1", tmp_path / "out")
    (tmp_path / "exists").mkdir()
    with pytest.raises(BuildError, match="already exists"):
        build(src, "m", "1", tmp_path / "exists")
    assert not (tmp_path / "out").exists()


def test_full_disk_leaves_nothing(models: ModelFiles, tmp_path: Path) -> None:
    """A file-size cap (RLIMIT_FSIZE) makes every write past 4 KiB fail as a full disk would."""
    script = (
        "import resource, signal, sys\n"
        "from converters.build import build\n"
        "from converters.errors import BuildError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    build(sys.argv[1], 'm', '1', sys.argv[2], variants=['onnx-fp32'])\n"
        "except BuildError as e:\n"
        "    print('BUILD ERROR', e); sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(models.path("mlp.onnx")), str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "no space left" in done.stdout or "I/O error" in done.stdout
    assert os.listdir(tmp_path) == []


def test_kill_9_mid_build_leaves_no_bundle_and_the_next_build_cleans_up(models: ModelFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.cli",
            "build",
            str(models.path("mlp.onnx")),
            "--name",
            "m",
            "--version",
            "1",
            "--out",
            str(out),
            "--variants",
            "openvino-fp32,openvino-fp16,onnx-fp32",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.building-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob(".out.building-*")), "the build never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    build(models.path("mlp.onnx"), "m", "1", out, variants=["onnx-fp32"])
    assert load_bundle(out).variants[0].id == "onnx-fp32"
    assert not list(tmp_path.glob(".out.building-*"))  # the dead build's temp dir is gone


def test_bundle_json_is_strict(onnx_bundle: Path, tmp_path: Path) -> None:
    data = json.loads((onnx_bundle / "bundle.json").read_text())
    for mutate, message in [
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d["variants"][0].update(file="../../etc/passwd"), "not a plain file name"),
        (lambda d: d["variants"][0].update(sha256="xyz"), "sha256"),
        (lambda d: d.update(schema_version=3), "schema_version"),
        (lambda d: d["inputs"][0].update(dtype="float1024"), "unknown dtype"),
    ]:
        d = json.loads(json.dumps(data))
        mutate(d)
        (tmp_path / "bundle.json").write_text(json.dumps(d))
        with pytest.raises(BundleError, match=message):
            load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(BundleError, match="not a valid bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="cannot read"):
        load_bundle(tmp_path / "missing")


def test_tampered_variant_file_is_detected(onnx_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(onnx_bundle, copy)
    bundle = load_bundle(copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 does not match"):
        verify_files(bundle, copy)


def test_cli_build_and_bad_options(models: ModelFiles, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fleet.cli", "build", str(models.path("tiny.onnx")), "--name", "tiny", "--version", "1"]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "ok"), "--variants", "onnx-fp32,openvino-fp32"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fleet build" in done.stderr and "onnx-fp32" in done.stderr and "synthetic samples" in done.stderr
    assert load_bundle(tmp_path / "ok").synthetic_samples
    done = subprocess.run([*cmd, "--out", str(tmp_path / "x"), "--tolerance", "int8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "expected VARIANT_OR_PRECISION=ATOL" in done.stderr
    done = subprocess.run([*cmd, "--out", str(tmp_path / "ok")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "error[build_failed]" in done.stderr and "already exists" in done.stderr


def test_builders_int8_reference_matches_numpy(models: ModelFiles) -> None:
    q = builders.Quantization.for_range(-1.0, 3.0)
    x = np.linspace(-1, 3, 50, dtype=np.float32)
    assert np.abs(q.dequantize(q.quantize(x)) - x).max() <= q.scale / 2 + 1e-6


KERAS_SCRIPT = """
import sys
import keras
from converters import builders
mlp = builders.random_mlp([16, 32, 5], seed=7)
m = keras.Sequential([keras.Input((16,), name="x"), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(5)])
for layer, dense in zip(m.layers, mlp.layers):
    layer.set_weights([dense.weight.T, dense.bias])
m.save(sys.argv[1] + "/model.keras")
m.export(sys.argv[1] + "/saved_model")
"""


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, builders.Mlp]:
    """A Keras MLP with the same weights as a numpy MLP, saved as .keras and as a SavedModel (in a child: TF is heavy)."""
    root = tmp_path_factory.mktemp("keras")
    done = subprocess.run([sys.executable, "-c", KERAS_SCRIPT, str(root)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, builders.random_mlp([16, 32, 5], seed=7)


def test_keras_source_to_tflite_and_openvino(keras_model: tuple[Path, builders.Mlp], tmp_path: Path) -> None:
    root, mlp = keras_model
    x = np.random.default_rng(0).uniform(-1, 1, (64, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    report = build(
        root / "model.keras",
        "k",
        "1",
        tmp_path / "out",
        samples=tmp_path / "x.npy",
        variants=["tflite-fp32", "tflite-int8", "openvino-fp32", "onnx-fp32"],
    )
    assert {v.id: v.state for v in report.variants} == {
        "tflite-fp32": "ok",
        "tflite-int8": "ok",
        "openvino-fp32": "ok",
        "onnx-fp32": "ok",  # through TFLite and tf2onnx
    }
    bundle = load_bundle(tmp_path / "out")
    assert bundle.source_format == "keras" and [t.name for t in bundle.inputs] == ["x"]
    out_name = bundle.outputs[0].name
    truth = mlp.reference(x)
    for v in bundle.variants:  # every variant answers by the same tensor names, close to the numpy truth
        with runtime_for_format(v.format)() as rt:
            rt.load(tmp_path / "out" / v.file)
            got = rt.infer({"x": x})[out_name]
        assert np.abs(got - truth).max() < (1e-4 if v.precision == "fp32" else 0.3), v.id
    int8 = next(v for v in bundle.variants if v.id == "tflite-int8")
    assert int8.parity.max_abs_error > 0 and int8.parity.top1_agreement is not None


def test_savedmodel_source(keras_model: tuple[Path, builders.Mlp], tmp_path: Path) -> None:
    root, _ = keras_model
    report = build(root / "saved_model", "sm", "1", tmp_path / "out", variants=["tflite-fp32", "openvino-fp32"])
    assert [v.state for v in report.variants] == ["ok", "ok"]
    bundle = load_bundle(tmp_path / "out")
    assert bundle.source_format == "savedmodel" and bundle.synthetic_samples
    empty = tmp_path / "not_a_saved_model"
    empty.mkdir()
    with pytest.raises(SourceError, match=r"without a saved_model\.pb"):
        build(empty, "sm", "1", tmp_path / "out2")


def test_pytorch_module_to_bundle(tmp_path: Path) -> None:
    import torch

    from converters.pytorch import build_pytorch

    torch.manual_seed(0)

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
            self.cls = torch.nn.Linear(16, 4)
            self.reg = torch.nn.Linear(16, 1)

        def forward(self, features: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.body(features) + bias
            return self.cls(h), self.reg(h)

    module = TwoHeads()
    report = build_pytorch(
        module,
        (torch.randn(1, 8), torch.zeros(1, 16)),
        "heads",
        "1",
        tmp_path / "out",
        input_names=["features", "bias"],
        output_names=["scores", "value"],
        variants=["onnx-fp32", "openvino-fp32"],
    )
    assert [v.state for v in report.variants] == ["ok", "ok"]
    bundle = load_bundle(tmp_path / "out")
    assert bundle.source_format == "pytorch"
    assert [t.name for t in bundle.inputs] == ["features", "bias"] and bundle.inputs[0].shape == [-1, 8]
    features, bias = torch.randn(5, 8), torch.randn(5, 16)
    with torch.no_grad():
        scores, value = module(features, bias)
    for v in bundle.variants:  # batch 5 through a model exported at batch 1: the batch is dynamic
        with runtime_for_format(v.format)() as rt:
            rt.load(tmp_path / "out" / v.file)
            got = rt.infer({"features": features.numpy(), "bias": bias.numpy()})
        np.testing.assert_allclose(got["scores"], scores.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["value"], value.numpy(), rtol=1e-4, atol=1e-5)


def test_pytorch_export_errors(tmp_path: Path) -> None:
    import torch

    from converters.pytorch import export_onnx

    with pytest.raises(SourceError, match="takes 1 inputs and returns 1 outputs"):
        export_onnx(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), tmp_path / "m.onnx", input_names=["a", "b"])

    class Bad(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.fft(x).real  # complex intermediates have no ONNX export

    with pytest.raises(SourceError, match=r"torch\.onnx\.export failed"):
        export_onnx(Bad(), (torch.zeros(1, 4),), tmp_path / "bad.onnx")


def test_readme_demo_model_builds_every_variant_it_can(tmp_path: Path) -> None:
    from converters.demo_models import linear_regression, logistic_regression, mlp_classifier

    fit = linear_regression()
    assert abs(float(fit.layers[0].weight[0, 0]) - 2.0) < 0.02 and abs(float(fit.layers[0].bias[0]) - 1.0) < 0.02
    blobs = np.array([[-1.5, -1.5], [1.5, 1.5]], np.float32)
    for clf in (logistic_regression(), mlp_classifier()):
        assert list(clf.reference(blobs).argmax(1)) == [0, 1]
    fleet = [sys.executable, "-m", "fleet.cli"]
    done = subprocess.run([*fleet, "demo-model", "linear", str(tmp_path / "demo.onnx")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [
            *fleet,
            "build",
            str(tmp_path / "demo.onnx"),
            "--name",
            "demo",
            "--version",
            "1.0.0",
            "--out",
            str(tmp_path / "demo-1.0.0"),
            "--archive",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    bundle = load_bundle(tmp_path / "demo-1.0.0")
    assert [v.id for v in bundle.variants] == ["openvino-fp32", "openvino-fp16", "onnx-fp32"]
    assert set(bundle.skipped) == {"tflite-fp32", "tflite-int8", "openvino-int8", "onnx-int8"}
    assert "only synthetic" in bundle.skipped["onnx-int8"].reason  # int8 needs real calibration samples
    assert (tmp_path / "demo-1.0.0.tar.gz").is_file()


def test_unsupported_operator_is_a_source_error(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("FluxCapacitor", ["x"], ["y"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "custom.onnx"))
    with pytest.raises(SourceError, match="FluxCapacitor"):
        build(tmp_path / "custom.onnx", "c", "1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


BLOCK_IMPORTS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "torch", "tf2onnx"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, Block())
"""


def test_missing_optional_dependencies_name_the_extra(keras_model: tuple[Path, builders.Mlp], models: ModelFiles, tmp_path: Path) -> None:
    """Where TensorFlow, tf2onnx or torch is absent (here: hidden by an import blocker) the error or the skip names the extra."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK_IMPORTS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    script = (
        "import sys\n"
        "from converters.build import build\n"
        "from converters.pytorch import export_onnx\n"
        "from converters.errors import MissingExtra\n"
        "try:\n"
        "    build(sys.argv[1], 'k', '1', sys.argv[2])\n"
        "except MissingExtra as e:\n"
        "    print('KERAS:', e)\n"
        "try:\n"
        "    export_onnx(object(), (), sys.argv[2] + '.onnx')\n"
        "except MissingExtra as e:\n"
        "    print('TORCH:', e)\n"
        "r = build(sys.argv[3], 't', '1', sys.argv[2] + '-t', variants=['tflite-fp32', 'onnx-fp32'])\n"
        "print('TF2ONNX:', r.bundle.skipped['onnx-fp32'].reason)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(keras_model[0] / "model.keras"), str(tmp_path / "out"), str(models.path("mlp.tflite"))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "KERAS: Keras and SavedModel sources need TensorFlow: pip install 'edgefleet[convert]'" in done.stdout, done.stderr[-2000:]
    assert "TORCH: PyTorch sources need torch: pip install 'edgefleet[pytorch]'" in done.stdout
    assert "TF2ONNX: no tflite -> ONNX converter: tf2onnx is not installed (extra: convert)" in done.stdout
    assert not (tmp_path / "out").exists()


def test_force_replaces_a_bundle_only_once_the_new_one_is_complete(models: ModelFiles, tmp_path: Path) -> None:
    out = tmp_path / "b"
    build(models.path("tiny.onnx"), "tiny", "1", out, variants=["onnx-fp32"])
    with pytest.raises(BuildError, match="onnx-int8"):  # a failing rebuild leaves the old bundle in place
        build(models.path("tiny.onnx"), "tiny", "2", out, variants=["onnx-int8"], tolerances={"int8": 1e-9}, force=True)
    assert load_bundle(out).version == "1"
    build(models.path("tiny.onnx"), "tiny", "2", out, variants=["onnx-fp32"], force=True)
    assert load_bundle(out).version == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp or replaced copies left


def test_a_live_build_is_not_mistaken_for_a_stale_one(models: ModelFiles, tmp_path: Path) -> None:
    import fcntl

    from converters.build import LOCK_FILE

    live = tmp_path / ".b.building-live"
    live.mkdir()
    with open(live / LOCK_FILE, "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a concurrent build holds it
        (tmp_path / ".b.building-dead").mkdir()
        (tmp_path / ".b.building-dead" / LOCK_FILE).write_bytes(b"")  # its owner was killed: nobody holds the lock
        build(models.path("tiny.onnx"), "tiny", "1", tmp_path / "b", variants=["onnx-fp32"])
        assert live.exists() and not (tmp_path / ".b.building-dead").exists()
