"""Ranking policy on the hardware edgefleet targets, and validation with fallback on real runtimes."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ModelFiles

from agent.errors import NoUsableRuntime
from agent.hardware import HardwareProfile, detect
from agent.runtimes import probe_all
from agent.runtimes.base import ProbeResult
from agent.runtimes.golden import GoldenSample
from agent.selection import ModelVariant, choose, rank, select
from converters import builders
from fleet.dev import hardware_trees


def v(name: str, fmt: str, precision: str = "fp32", static: bool | None = None, hints: tuple[str, ...] = ()) -> ModelVariant:
    return ModelVariant(path=Path(name), format=fmt, precision=precision, static_shapes=static, hints=frozenset(hints))  # type: ignore[arg-type]


# Probe results as a device with these runtimes installed would report them (this machine has no GPU or NPU).
JETSON_PROBES = {
    "tensorrt": ProbeResult("tensorrt", True, "10.3.0", ("GPU.0",)),
    "onnx": ProbeResult("onnx", True, "1.20.0", ("TENSORRT", "CUDA", "CPU")),
    "litert": ProbeResult("litert", True, "2.3.0", ("CPU",)),
}
INTEL_PROBES = {
    "openvino": ProbeResult("openvino", True, "2026.4", ("CPU", "GPU.0", "NPU")),
    "onnx": ProbeResult("onnx", True, "1.20.0", ("CPU",)),
    "litert": ProbeResult("litert", True, "2.3.0", ("CPU",)),
}
CORAL_PROBES = {"litert": ProbeResult("litert", True, "2.3.0", ("CPU", "EDGETPU")), "onnx": ProbeResult("onnx", True, "1.20", ("CPU",))}

BUNDLE = [
    v("m.tflite", "tflite"),
    v("m_int8.tflite", "tflite", "int8"),
    v("m.onnx", "onnx"),
    v("m_fp16.xml", "openvino", "fp16", static=True),
    v("m_int8.xml", "openvino", "int8", static=True),
    v("m_dyn.xml", "openvino", "fp32", static=False),
    v("m_edgetpu.tflite", "tflite", "int8", hints=("edgetpu",)),
]


def labels(profile: HardwareProfile, probes: dict[str, ProbeResult], variants: list[ModelVariant] = BUNDLE) -> list[str]:
    return [f"{c.runtime}:{c.device}:{c.variant.path.name}" for c in rank(profile, probes, variants).candidates]


def test_jetson_prefers_tensorrt_then_cuda_then_cpu(tmp_path: Path) -> None:
    order = labels(detect(hardware_trees.jetson_orin(tmp_path)), JETSON_PROBES)
    assert order[:3] == ["tensorrt:GPU.0:m.onnx", "onnx:CUDA:m.onnx", "litert:CPU:m_int8.tflite"]
    assert "litert:CPU:m.tflite" in order
    assert not any("edgetpu" in x for x in order)  # no Coral: the Edge TPU variant is useless here


def test_jetson_without_tensorrt_installed_falls_back_with_reason(tmp_path: Path) -> None:
    probes = {**JETSON_PROBES, "tensorrt": ProbeResult("tensorrt", False, reason="tensorrt is not installed")}
    r = rank(detect(hardware_trees.jetson_orin(tmp_path)), probes, BUNDLE)
    assert r.candidates[0].runtime == "onnx" and r.candidates[0].device == "CUDA"
    assert ("tensorrt:GPU.0", "tensorrt is not installed") in r.excluded
    assert any(w == "m_edgetpu.tflite" and "no Coral" in why for w, why in r.excluded)


def test_intel_npu_takes_static_variants_only(tmp_path: Path) -> None:
    profile = detect(hardware_trees.intel_core_ultra(tmp_path))
    r = rank(profile, INTEL_PROBES, BUNDLE)
    order = [f"{c.runtime}:{c.device}:{c.variant.path.name}" for c in r.candidates]
    assert order[:2] == ["openvino:NPU:m_int8.xml", "openvino:NPU:m_fp16.xml"]
    assert "openvino:NPU:m_dyn.xml" not in order
    assert any("m_dyn.xml" in w and "static shapes" in why for w, why in r.excluded)
    gpu = [x for x in order if ":GPU:" in x]
    assert gpu[0] == "openvino:GPU:m_fp16.xml"  # fp16 first on a GPU
    assert order.index(gpu[0]) < order.index("openvino:CPU:m_int8.xml")
    assert "NPU" in r.candidates[0].reason


def test_amd_xdna_box_gets_no_npu_candidates(tmp_path: Path) -> None:
    order = labels(detect(hardware_trees.amd_xdna(tmp_path)), INTEL_PROBES)
    assert not any(":NPU:" in x or ":GPU:" in x for x in order)
    assert order[0] == "openvino:CPU:m_int8.xml"  # avx512_vnni: int8 first


def test_coral_runs_the_edgetpu_variant_on_the_delegate(tmp_path: Path) -> None:
    order = labels(detect(hardware_trees.coral_usb(tmp_path)), CORAL_PROBES)
    assert order[0] == "litert:EDGETPU:m_edgetpu.tflite"
    assert [x for x in order if "edgetpu" in x] == ["litert:EDGETPU:m_edgetpu.tflite"]  # never on the CPU
    assert order[1] == "litert:CPU:m_int8.tflite"


def test_raspberry_pi_5_litert_int8_first(tmp_path: Path) -> None:
    probes = {"litert": CORAL_PROBES["litert"], "onnx": CORAL_PROBES["onnx"]}
    order = labels(detect(hardware_trees.raspberry_pi_5(tmp_path)), probes)
    assert order[:3] == ["litert:CPU:m_int8.tflite", "litert:CPU:m.tflite", "onnx:CPU:m.onnx"]
    r = rank(detect(tmp_path), probes, BUNDLE)
    assert any(w == "litert:EDGETPU" for w, _ in r.excluded) is False  # no Coral: that tier is not even considered


def test_plain_x86_fastest_cpu_runtime_per_variant(tmp_path: Path) -> None:
    probes = {k: ProbeResult(k, True, "1", ("CPU",)) for k in ("openvino", "onnx", "litert")}
    order = labels(detect(hardware_trees.plain_x86(tmp_path)), probes)
    assert order[0] == "openvino:CPU:m_dyn.xml"  # fp32 IR first: no VNNI, so int8 is not faster
    assert order.index("onnx:CPU:m.onnx") < order.index("litert:CPU:m.tflite")
    assert order.index("litert:CPU:m.tflite") < order.index("litert:CPU:m_int8.tflite")


def test_forced_runtime_replaces_the_policy(tmp_path: Path) -> None:
    r = rank(detect(hardware_trees.plain_x86(tmp_path)), probe_all(), BUNDLE, force_runtime="litert", force_device="cpu")
    assert {c.runtime for c in r.candidates} == {"litert"} and {c.device for c in r.candidates} == {"CPU"}
    assert all(c.reason == "forced by settings" for c in r.candidates)
    r = rank(detect(tmp_path), probe_all(), [v("m.xml", "openvino")], force_runtime="onnx")
    why = "onnx reads .onnx; this model is OpenVINO IR (.xml); runtimes that read OpenVINO IR (.xml): openvino"
    assert r.candidates == [] and (("onnx", why) in r.excluded)


# ---------------------------------------------------------------- validation on real runtimes


def real_variants(models: ModelFiles) -> list[ModelVariant]:
    return [ModelVariant.from_path(models.path(n)) for n in ("mlp.xml", "mlp.onnx", "mlp.tflite")]


def golden(models: ModelFiles, atol: float = 1e-4) -> GoldenSample:
    x = models.calibration[:4]
    return GoldenSample({"x": x}, {"y": models.mlp.reference(x)}, atol=atol)


def test_validated_choice_on_this_machine(models: ModelFiles) -> None:
    sel, ranking = choose(detect(), probe_all(), real_variants(models), [golden(models)])
    assert sel.candidate == ranking.candidates[0] and sel.attempts == []
    assert sel.candidate.runtime == "openvino" and sel.candidate.variant.format == "openvino"
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(sel.runtime.infer({"x": x})["y"], models.mlp.reference(x), rtol=1e-4, atol=1e-4)
    sel.runtime.close()


def test_corrupt_top_candidate_falls_back_and_says_why(models: ModelFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copy(models.path("mlp.xml"), tmp_path / "mlp.xml")
    (tmp_path / "mlp.bin").write_bytes(b"\0" * 10)  # truncated weights
    variants = [ModelVariant.from_path(tmp_path / "mlp.xml"), ModelVariant.from_path(models.path("mlp.onnx"))]
    with caplog.at_level(logging.INFO, logger="edgefleet.selection"):
        sel, _ = choose(detect(), probe_all(), variants, [golden(models)])
    assert sel.candidate.runtime == "onnx"
    assert len(sel.attempts) == 1
    assert sel.attempts[0][0] == "openvino:CPU openvino/fp32" and "ModelLoadError" in sel.attempts[0][1]
    assert "event=selection.fallback" in caplog.text and "event=selection.chosen" in caplog.text
    sel.runtime.close()


def test_wrong_answers_fail_the_golden_sample(models: ModelFiles, tmp_path: Path) -> None:
    other = builders.random_mlp([64, 128, 128, 10], seed=99)  # same signature, different weights
    builders.write_onnx_mlp(other, tmp_path / "wrong.onnx")
    builders.write_openvino_ir(tmp_path / "wrong.onnx", tmp_path / "wrong.xml")
    variants = [ModelVariant.from_path(tmp_path / "wrong.xml"), ModelVariant.from_path(models.path("mlp.tflite"))]
    sel, _ = choose(detect(), probe_all(), variants, [golden(models)])
    assert sel.candidate.variant.path == models.path("mlp.tflite")
    assert "HealthCheckFailed" in sel.attempts[0][1] and "max abs error" in sel.attempts[0][1]
    sel.runtime.close()


def test_int8_outside_a_tight_tolerance_falls_back_to_fp32(models: ModelFiles) -> None:
    variants = [ModelVariant.from_path(models.path("mlp_int8.tflite"), "int8"), ModelVariant.from_path(models.path("mlp.tflite"))]
    ranking = rank(detect(hardware_trees.raspberry_pi_5(Path(models.root) / "pi")), probe_all(), variants)
    assert ranking.candidates[0].variant.precision == "int8"
    sel = select(ranking.candidates, [golden(models, atol=1e-5)])
    assert sel.candidate.variant.precision == "fp32" and "HealthCheckFailed" in sel.attempts[0][1]
    sel.runtime.close()
    loose = select(ranking.candidates, [golden(models, atol=0.2)])
    assert loose.candidate.variant.precision == "int8" and loose.attempts == []
    loose.runtime.close()


def test_nothing_works_raises_with_every_reason(models: ModelFiles, tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(NoUsableRuntime) as info:
        choose(detect(), probe_all(), [ModelVariant.from_path(tmp_path / "junk.onnx")])
    assert [a[0] for a in info.value.attempts] == ["onnx:CPU onnx/fp32", "openvino:CPU onnx/fp32"]
    assert "no runtime could run this model" in str(info.value)


def test_forced_runtime_that_is_not_installed(models: ModelFiles) -> None:
    with pytest.raises(NoUsableRuntime) as info:
        choose(detect(), probe_all(), real_variants(models), force_runtime="tensorrt")
    assert any("not installed" in why for _, why in info.value.attempts)


def test_latency_budget(models: ModelFiles) -> None:
    ranking = rank(detect(), probe_all(), real_variants(models))
    with pytest.raises(NoUsableRuntime, match="exceeds the budget"):
        select(ranking.candidates, latency_budget_s=0.0)
    sel = select(ranking.candidates, latency_budget_s=5.0)
    sel.runtime.close()


def test_onnxruntime_provider_order_follows_the_hardware(tmp_path: Path) -> None:
    from agent.errors import RuntimeUnavailable
    from agent.runtimes.onnx import provider_order

    installed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"]
    jetson = detect(hardware_trees.jetson_orin(tmp_path / "jetson"))
    intel = detect(hardware_trees.intel_core_ultra(tmp_path / "intel"))
    pi = detect(hardware_trees.raspberry_pi_5(tmp_path / "pi"))
    assert provider_order("AUTO", installed, jetson) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_order("AUTO", installed, intel) == ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
    assert provider_order(None, installed, pi) == ["CPUExecutionProvider"]
    assert provider_order("CUDA", installed, pi) == ["CUDAExecutionProvider", "CPUExecutionProvider"]  # forced: the user knows
    assert provider_order("TENSORRT", installed) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(RuntimeUnavailable, match="CUDAExecutionProvider is not installed"):
        provider_order("CUDA", ["CPUExecutionProvider"])
    with pytest.raises(RuntimeUnavailable, match="got NPU"):
        provider_order("NPU", installed)
