"""Every installed runtime runs real models and agrees with numpy; bad input gets typed errors."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ModelFiles

from agent.errors import (
    DtypeMismatch,
    EmptyInput,
    InvalidOptions,
    MissingInput,
    ModelLoadError,
    NonFiniteInput,
    RuntimeClosed,
    ShapeMismatch,
    UnknownInput,
    UnsupportedModelFormat,
)
from agent.runtimes import get_runtime, probe_all, runtime_classes
from agent.runtimes.base import Runtime, model_format
from converters.builders import add_mul_reference

# (runtime, file suffix): every pairing a runtime reads. CI installs litert, openvino and onnx, so none is skipped.
PAIRS = [("litert", "tflite"), ("openvino", "xml"), ("openvino", "onnx"), ("openvino", "tflite"), ("onnx", "onnx")]
IDS = [f"{r}-{s}" for r, s in PAIRS]


def load(runtime: str, path: Path, **options: object) -> Runtime:
    rt = get_runtime(runtime)()
    rt.load(path, options=options or None)
    return rt


def test_registry_finds_one_class_per_file() -> None:
    assert set(runtime_classes()) == {"litert", "openvino", "onnx", "tensorrt"}
    probes = probe_all()
    for name in ("litert", "openvino", "onnx"):
        assert probes[name].available, probes[name].reason
        assert probes[name].version and "CPU" in probes[name].devices


@pytest.mark.parametrize(("runtime", "suffix"), PAIRS, ids=IDS)
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_mlp_matches_numpy(models: ModelFiles, runtime: str, suffix: str, batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
    with load(runtime, models.path(f"mlp.{suffix}")) as rt:
        out = rt.infer({"x": x})
    assert set(out) == {"y"}
    assert out["y"].shape == (batch, 10) and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], models.mlp.reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("runtime", "suffix"), PAIRS, ids=IDS)
def test_tiny_model_and_description(models: ModelFiles, runtime: str, suffix: str) -> None:
    with load(runtime, models.path(f"tiny.{suffix}")) as rt:
        d = rt.describe()
        assert d.runtime == runtime and d.runtime_version == probe_all()[runtime].version
        assert [(t.name, t.shape, t.dtype.name) for t in d.inputs] == [("x", (-1, 4), "float32")]
        assert [(t.name, t.shape, t.dtype.name) for t in d.outputs] == [("y", (-1, 4), "float32")]
        assert "CPU" in d.device.upper()
        assert rt.warmup() > 0
        x = np.array([[1.0, -2.0, 3.0, 0.5]], dtype=np.float32)
        np.testing.assert_allclose(rt.infer({"x": x})["y"], models.tiny.reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("runtime", "suffix"), PAIRS, ids=IDS)
def test_two_inputs_two_outputs_by_name(models: ModelFiles, runtime: str, suffix: str) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    with load(runtime, models.path(f"add_mul.{suffix}")) as rt:
        assert [t.name for t in rt.inputs] == ["a", "b"]
        out = rt.infer({"b": b, "a": a})  # order of the mapping must not matter
    want = add_mul_reference(a, b)
    assert set(out) == {"sum", "product"}
    for name in want:
        np.testing.assert_allclose(out[name], want[name], rtol=1e-6)


def test_int8_tflite_quantizes_and_dequantizes(models: ModelFiles) -> None:
    x = models.calibration[:32]
    with load("litert", models.path("mlp_int8.tflite")) as rt:
        (spec,) = rt.inputs
        assert spec.dtype == np.int8 and spec.quantization is not None and spec.shape == (-1, 64)
        assert rt.outputs[0].quantization is not None
        y = rt.infer({"x": x})["y"]
        raw = rt.infer({"x": np.clip(np.round(x / spec.quantization[0]) + spec.quantization[1], -128, 127).astype(np.int8)})["y"]
    assert y.dtype == np.float32 and y.shape == (32, 10)
    ref = models.mlp.reference(x)
    out_scale = rt.outputs[0].quantization[0]  # type: ignore[index]
    # int8 through three layers: within a few output quantization steps, and the same ranking of classes.
    assert np.max(np.abs(y - ref)) < 8 * out_scale
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.9
    np.testing.assert_array_equal(raw, y)  # raw int8 input passes through unquantized


def test_static_model_refuses_other_batch(models: ModelFiles) -> None:
    for runtime in ("onnx", "openvino"):
        with load(runtime, models.path("mlp_static.onnx")) as rt:
            assert rt.inputs[0].shape == (1, 64) and rt.inputs[0].is_static
            with pytest.raises(ShapeMismatch, match=r"expected shape \[1x64\], got \[2, 64\]"):
                rt.infer({"x": np.zeros((2, 64), np.float32)})


@pytest.mark.parametrize(("runtime", "suffix"), PAIRS, ids=IDS)
def test_batch_changes_back_and_forth(models: ModelFiles, runtime: str, suffix: str) -> None:
    with load(runtime, models.path(f"mlp.{suffix}")) as rt:
        for batch in (4, 1, 7, 4, 1):
            x = np.full((batch, 64), 0.1, np.float32)
            np.testing.assert_allclose(rt.infer({"x": x})["y"], models.mlp.reference(x), rtol=1e-4, atol=1e-5)


BAD_INPUTS = [
    ({"nope": np.zeros((1, 64), np.float32)}, UnknownInput, "unknown input 'nope'"),
    ({}, MissingInput, "missing input 'x'"),
    ({"x": np.zeros((1, 64)), "extra": 1}, UnknownInput, "unknown input 'extra'"),
    ({"x": np.zeros((64,), np.float32)}, ShapeMismatch, r"expected shape \[\?x64\], got \[64\]"),
    ({"x": np.zeros((1, 63), np.float32)}, ShapeMismatch, "got \\[1, 63\\]"),
    ({"x": np.zeros((1, 64, 1), np.float32)}, ShapeMismatch, "expected shape"),
    ({"x": np.zeros((0, 64), np.float32)}, EmptyInput, "empty"),
    ({"x": np.full((1, 64), np.nan, np.float32)}, NonFiniteInput, "NaN"),
    ({"x": np.full((1, 64), np.inf)}, NonFiniteInput, "infinity"),
    ({"x": np.array([["a"] * 64])}, DtypeMismatch, "expected numbers"),
    ({"x": [[1.0, 2.0], [3.0]]}, DtypeMismatch, "rectangular"),
    ({"x": None}, DtypeMismatch, "expected numbers"),
    ({"x": np.zeros((1, 64), np.complex64)}, DtypeMismatch, "expected numbers"),
]


@pytest.mark.parametrize(("runtime", "suffix"), PAIRS, ids=IDS)
def test_bad_inputs_get_typed_errors_and_the_runtime_keeps_serving(models: ModelFiles, runtime: str, suffix: str) -> None:
    good = np.ones((2, 64), np.float32)
    with load(runtime, models.path(f"mlp.{suffix}")) as rt:
        for inputs, error, message in BAD_INPUTS:
            with pytest.raises(error, match=message):
                rt.infer(inputs)  # type: ignore[arg-type]
            np.testing.assert_allclose(rt.infer({"x": good})["y"], models.mlp.reference(good), rtol=1e-4, atol=1e-4)
        with pytest.raises(UnknownInput, match="mapping"):
            rt.infer([good])  # type: ignore[arg-type]


@pytest.mark.parametrize(("runtime", "suffix"), PAIRS, ids=IDS)
def test_a_shape_already_served_is_still_checked_and_converted(models: ModelFiles, runtime: str, suffix: str) -> None:
    """After the first request of a shape, requests of it skip to the finiteness check and the backend's prepared call
    (``Runtime.infer``): everything else about them must still be checked, converted or refused as on the first."""
    good = np.random.default_rng(3).uniform(-1, 1, (3, 64)).astype(np.float32)
    want = models.mlp.reference(good)
    with load(runtime, models.path(f"mlp.{suffix}")) as rt:
        for _ in range(2):
            np.testing.assert_allclose(rt.infer({"x": good})["y"], want, rtol=1e-4, atol=1e-4)
        assert good.shape in rt._signatures  # the path under test is the one taken
        fortran = np.asfortranarray(good)  # same shape and dtype, another layout
        assert not fortran.flags.c_contiguous
        np.testing.assert_allclose(rt.infer({"x": fortran})["y"], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(rt.infer({"x": good.astype(np.float64)})["y"], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(rt.infer({"x": good.tolist()})["y"], want, rtol=1e-4, atol=1e-4)
        for bad in (np.nan, np.inf, -np.inf):
            x = good.copy()
            x[1, 7] = bad
            with pytest.raises(NonFiniteInput):
                rt.infer({"x": x})
        with pytest.raises(UnknownInput):
            rt.infer({"y": good})
        with np.errstate(invalid="raise"), pytest.raises(NonFiniteInput):  # numpy raising FloatingPointError: still typed
            rt.infer({"x": np.where(np.arange(good.size).reshape(good.shape) == 5, np.inf, good).astype(np.float32)})
        np.testing.assert_allclose(rt.infer(good)["y"], want, rtol=1e-4, atol=1e-4)  # one bare array
        other = good[:1].copy()  # another batch size moves the backend's buffers; the first shape must still be right
        np.testing.assert_allclose(rt.infer({"x": other})["y"], want[:1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(rt.infer({"x": good})["y"], want, rtol=1e-4, atol=1e-4)
        rt.close()
        with pytest.raises(RuntimeClosed):
            rt.infer({"x": good})


@pytest.mark.parametrize("batch", [1, 16, 128])  # 64 floats: a Python sum; 1024: a dot with zeros; 8192: a dot with itself
def test_finiteness_check_on_small_and_large_inputs(models: ModelFiles, batch: int) -> None:
    with load("onnx", models.path("mlp.onnx")) as rt:
        big = np.full((batch, 64), 3e38, np.float32)  # finite, but its sum or dot overflows
        assert rt.infer({"x": big})["y"].shape == (batch, 10)
        for bad in (np.nan, np.inf, -np.inf):
            x = np.zeros((batch, 64), np.float32)
            x[-1, -1] = bad
            with pytest.raises(NonFiniteInput):
                rt.infer({"x": x})
        mixed = np.zeros((batch, 64), np.float32)
        mixed[0, 0], mixed[-1, -1] = np.inf, -np.inf  # inf - inf: the sum is NaN, still refused
        with pytest.raises(NonFiniteInput):
            rt.infer({"x": mixed})


def test_lists_and_wider_types_are_converted(models: ModelFiles) -> None:
    with load("onnx", models.path("tiny.onnx")) as rt:
        as_list = rt.infer({"x": [[1, 2, 3, 4]]})["y"]  # ints in a nested list (as JSON gives them)
        as_f64 = rt.infer({"x": np.array([[1.0, 2.0, 3.0, 4.0]])})["y"]
        strided = rt.infer({"x": np.arange(8, dtype=np.float32).reshape(4, 2).T[:1] * 0 + np.array([[1, 2, 3, 4]], np.float32)})["y"]
    np.testing.assert_allclose(as_list, models.tiny.reference(np.array([[1, 2, 3, 4]], np.float32)), rtol=1e-6)
    np.testing.assert_array_equal(as_list, as_f64)
    np.testing.assert_array_equal(as_list, strided)


def _corruptions(data: bytes) -> dict[str, bytes]:
    n = len(data)
    return {
        "empty": b"",
        "one byte": data[:1],
        "header only": data[:16],
        "quarter": data[: n // 4],
        "half": data[: n // 2],
        "all but the last 16 bytes": data[: n - 16],
        "random": np.random.default_rng(0).bytes(n),
        "text": b"this is not a model\n" * 50,
    }


@pytest.mark.parametrize(("runtime", "suffix"), PAIRS, ids=IDS)
def test_corrupt_and_truncated_models_raise_model_load_error(models: ModelFiles, runtime: str, suffix: str, tmp_path: Path) -> None:
    src = models.path(f"mlp.{suffix}")
    failures = {}
    for label, blob in _corruptions(src.read_bytes()).items():
        p = tmp_path / f"{label.replace(' ', '_')}.{suffix}"
        p.write_bytes(blob)
        if suffix == "xml":
            shutil.copy(src.with_suffix(".bin"), p.with_suffix(".bin"))
        rt = get_runtime(runtime)()
        with pytest.raises(ModelLoadError) as info:
            rt.load(p)
        failures[label] = str(info.value)
        with pytest.raises(RuntimeClosed):
            rt.infer({"x": np.zeros((1, 64), np.float32)})
    assert all(msg for msg in failures.values())


def test_openvino_ir_without_its_weights(models: ModelFiles, tmp_path: Path) -> None:
    shutil.copy(models.path("mlp.xml"), tmp_path / "m.xml")
    with pytest.raises(ModelLoadError, match=r"openvino could not load m\.xml"):
        load("openvino", tmp_path / "m.xml")
    (tmp_path / "m.bin").write_bytes(models.path("mlp.bin").read_bytes()[:100])  # truncated weights
    with pytest.raises(ModelLoadError):
        load("openvino", tmp_path / "m.xml")


def test_wrong_format_for_runtime_and_unknown_files(models: ModelFiles, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelFormat, match="litert cannot read onnx"):
        load("litert", models.path("mlp.onnx"))
    with pytest.raises(UnsupportedModelFormat, match="onnx cannot read tflite"):
        load("onnx", models.path("mlp.tflite"))
    (tmp_path / "model.pt").write_bytes(b"\x80\x02pickle")
    with pytest.raises(UnsupportedModelFormat, match="unknown model format"):
        load("onnx", tmp_path / "model.pt")
    with pytest.raises(ModelLoadError, match="not found"):
        load("onnx", tmp_path / "missing.onnx")
    # TFLite content under an .onnx name is recognised by its magic and refused by onnxruntime.
    shutil.copy(models.path("mlp.tflite"), tmp_path / "renamed.onnx")
    assert model_format(tmp_path / "renamed.onnx") == "tflite"


def test_unknown_options_are_refused_by_name(models: ModelFiles) -> None:
    with pytest.raises(InvalidOptions, match="num_thread"):
        load("litert", models.path("tiny.tflite"), num_thread=2)
    with pytest.raises(InvalidOptions, match="performance_hint='FAST'"):
        load("openvino", models.path("tiny.xml"), performance_hint="FAST")


def test_onnx_worker_threads_spin_briefly_then_sleep(models: ModelFiles) -> None:
    """A worker busy-waits ``spin_us`` (20 us by default) for the next parallel section, then sleeps; ``spin_us = 0``
    sleeps at once; ``allow_spinning = true`` is onnxruntime's own spin. Read back from the session onnxruntime built:
    what ``spin_plan`` plans (pinned below) is what the session gets."""
    import onnxruntime

    from agent.runtimes.onnx import OnnxOptions, spin_plan

    for options in ({}, {"spin_us": 100}, {"spin_us": 0}, {"allow_spinning": True}):
        planned = spin_plan(OnnxOptions(**options), onnxruntime.__version__)
        rt = load("onnx", models.path("mlp.onnx"), intra_op_threads=2, **options)
        built = rt._session.get_session_options()  # type: ignore[attr-defined]
        for pool in ("intra_op", "inter_op"):
            for key in (f"session.{pool}.allow_spinning", f"session.{pool}.spin_duration_us"):
                assert _config_entry(built, key) == planned.entries.get(key), key
        assert rt.describe().details["spin"] == planned.said
        rt.close()
    for bad in ({"spin_us": -1}, {"spin_us": "20"}, {"spin_us": True}):
        with pytest.raises(InvalidOptions, match="spin_us"):
            load("onnx", models.path("mlp.onnx"), **bad)


def _config_entry(options: Any, key: str) -> str | None:
    try:
        return options.get_session_config_entry(key)  # type: ignore[no-any-return]
    except RuntimeError:  # onnxruntime's answer for a key never set
        return None


def test_onnx_spin_plan_by_version() -> None:
    """onnxruntime before 1.26 does not know a spin duration and would spin its own long spin: there the workers never
    spin, and ``describe()`` says why."""
    from agent.runtimes.onnx import OnnxOptions, spin_plan

    off = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
    bounded = {**{k: "1" for k in off}, "session.intra_op.spin_duration_us": "20", "session.inter_op.spin_duration_us": "20"}
    for version in ("1.26.0", "1.32.0+cu12", "1.27.0.dev20260401", "2.0.0"):
        assert spin_plan(OnnxOptions(), version).entries == bounded, version
        assert spin_plan(OnnxOptions(), version).said == "20 us"
    for version in ("1.25.1", "1.17.0", "garbage", ""):
        assert spin_plan(OnnxOptions(), version).entries == off, version
        assert spin_plan(OnnxOptions(), version).said.startswith("off: onnxruntime")
    assert spin_plan(OnnxOptions(spin_us=0), "1.32.0") == spin_plan(OnnxOptions(spin_us=0), "1.25.1")
    assert spin_plan(OnnxOptions(spin_us=0), "1.32.0").said == "off"
    assert spin_plan(OnnxOptions(allow_spinning=True), "1.25.1").entries == {k: "1" for k in off}


def test_onnx_before_bounded_spinning_workers_sleep_at_once(models: ModelFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    """An onnxruntime that says it is 1.25 gets a session whose workers never spin, whatever ``spin_us`` asks."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.25.1")
    rt = load("onnx", models.path("mlp.onnx"), intra_op_threads=2)
    built = rt._session.get_session_options()  # type: ignore[attr-defined]
    assert _config_entry(built, "session.intra_op.allow_spinning") == "0"
    assert _config_entry(built, "session.intra_op.spin_duration_us") is None
    assert rt.describe().details["spin"] == "off: onnxruntime 1.25.1 cannot bound a spin (1.26 can)"
    rt.close()


def _thread_cpu_ns() -> dict[str, int]:
    """Nanoseconds on a CPU so far of each of this process's threads (Linux's schedstat), by thread id."""
    spent = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            spent[task.name] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that ended while read
            continue
    return spent


@pytest.mark.skipif(
    not Path("/proc/self/task/").exists() or not any(Path("/proc/self/task").glob("*/schedstat")),
    reason="needs Linux's per-thread schedstat",
)
def test_onnx_idle_workers_take_no_core_after_a_request(models: ModelFiles) -> None:
    """After a burst of requests the agent's default leaves the session's worker threads asleep: they spend next to no
    CPU while the process waits. onnxruntime's own spin, the control, spends milliseconds. Only the threads the session
    started are counted, so no other thread of the test process can move the figure."""

    def idle_worker_cpu_ms(**options: Any) -> float:
        before = set(_thread_cpu_ns())
        rt = load("onnx", models.path("mlp.onnx"), intra_op_threads=2, **options)
        x = np.ones((1, 64), np.float32)
        for _ in range(20):
            rt.infer({"x": x})
        start = {tid: ns for tid, ns in _thread_cpu_ns().items() if tid not in before}
        time.sleep(0.3)  # not a wait for a condition: the idle stretch whose worker CPU is measured
        end = _thread_cpu_ns()
        rt.close()
        assert start, "the session started no worker thread"
        return sum(end.get(tid, ns) - ns for tid, ns in start.items()) / 1e6

    assert idle_worker_cpu_ms() < 1.0
    assert idle_worker_cpu_ms(allow_spinning=True) > 2.0


def test_unavailable_device_is_a_clear_error(models: ModelFiles) -> None:
    from agent.errors import RuntimeUnavailable

    with pytest.raises(RuntimeUnavailable, match="NPU not present"):
        get_runtime("openvino")().load(models.path("tiny.xml"), device="NPU")
    with pytest.raises(RuntimeUnavailable, match="CUDAExecutionProvider is not installed"):
        get_runtime("onnx")().load(models.path("tiny.onnx"), device="CUDA")
    with pytest.raises(RuntimeUnavailable, match="Edge TPU delegate unavailable"):
        get_runtime("litert")().load(models.path("tiny.tflite"), device="EDGETPU")


def test_openvino_compiled_model_cache(models: ModelFiles, tmp_path: Path) -> None:
    cache = tmp_path / "ov-cache"
    with load("openvino", models.path("mlp.xml"), cache_dir=cache, performance_hint="THROUGHPUT") as rt:
        assert rt.describe().details["cache_dir"] == str(cache)
        rt.infer({"x": np.ones((1, 64), np.float32)})
    assert any(cache.iterdir()), "OpenVINO wrote no compiled blob"


def test_closed_runtime_refuses_work(models: ModelFiles) -> None:
    rt = load("onnx", models.path("tiny.onnx"))
    rt.close()
    rt.close()  # idempotent
    with pytest.raises(RuntimeClosed):
        rt.infer({"x": np.zeros((1, 4), np.float32)})
    with pytest.raises(RuntimeClosed):
        rt.describe()


@pytest.mark.parametrize(("runtime", "suffix"), PAIRS, ids=IDS)
def test_concurrent_callers_get_their_own_answers(models: ModelFiles, runtime: str, suffix: str) -> None:
    errors: list[str] = []
    with load(runtime, models.path(f"mlp.{suffix}")) as rt:

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(30):
                x = rng.standard_normal((int(rng.integers(1, 5)), 64)).astype(np.float32)
                y = rt.infer({"x": x})["y"]
                if not np.allclose(y, models.mlp.reference(x), rtol=1e-4, atol=1e-4):
                    errors.append(f"thread {seed}: wrong answer")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_runtimes_left_out_of_runtime_enabled_are_never_imported() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from agent.runtimes import probe_all; r = probe_all(['litert']);"
        "print(r['litert'].available, r['openvino'].reason, 'openvino' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
    assert out == "True not enabled in the settings (runtime.enabled) False False", out


def test_a_refused_non_finite_input_prints_no_numpy_warning(models: ModelFiles) -> None:
    """The fast path's dot product sets numpy's "invalid" flag on NaN or infinity; the input is refused with a typed
    error, and nothing is printed to the agent's stderr (a fresh process: numpy warns once per process)."""
    import subprocess
    import sys

    script = f"""
import numpy as np
from agent.errors import NonFiniteInput
from agent.runtimes import get_runtime
rt = get_runtime("onnx")()
rt.load({str(models.path("mlp.onnx"))!r})
good = np.zeros((16, 64), np.float32)
rt.infer({{"x": good}}); rt.infer({{"x": good}})  # the second takes the fast path
for bad in (np.nan, np.inf):
    x = good.copy(); x[3, 3] = bad
    try:
        rt.infer({{"x": x}})
    except NonFiniteInput:
        print("refused")
import warnings
warnings.warn("still shown", RuntimeWarning)  # other warnings are not hidden
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["refused", "refused"]
    assert "invalid value" not in done.stderr and "still shown" in done.stderr
