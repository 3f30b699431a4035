"""A runtime is one file: a toy runtime declared and registered here, and nowhere else, is probed, ranked,
selected, configured in the settings and preferred by the fleet."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import InvalidOptions
from agent.hardware import HardwareProfile, detect
from agent.runtimes import get_runtime, probe_all, register, runtime_classes, unregister
from agent.runtimes.base import Band, ProbeResult, Runtime, RuntimeOptions, Tier
from agent.runtimes.golden import GoldenSample
from agent.runtimes.tensors import TensorSpec
from agent.selection import ModelVariant, choose, preferred_variants, rank
from agent.settings import load_settings
from fleet.dev import hardware_trees
from fleet.rollout import pick_variant
from fleet.store import Device


class ToyOptions(RuntimeOptions):
    scale: float = 1.0


class ToyRuntime(Runtime):
    """Multiplies its one input by ``scale``; reads ONNX files without looking inside them."""

    name = "toy"
    formats = frozenset({"onnx"})
    Options = ToyOptions
    default_device = "TOY"
    variants = ("onnx-int8", "onnx-fp32")
    fleet_order = 0
    loaded_with: HardwareProfile | None = None

    @classmethod
    def probe(cls) -> ProbeResult:
        return ProbeResult(cls.name, True, "0.1", ("CPU", "TOY"))

    @classmethod
    def tiers(cls, profile: HardwareProfile) -> list[Tier]:
        return [Tier(Band.CPU - 1, cls.name, "CPU", ("onnx",), "toy: ahead of every CPU runtime", ("int8", "fp32", "fp16"))]

    def _load(self, path: Path, fmt: str, device: str | None, options: Any, profile: HardwareProfile | None) -> None:
        self.scale = options.scale
        type(self).loaded_with = profile
        self._inputs = (TensorSpec("x", (-1, 4), np.dtype(np.float32)),)
        self._outputs = (TensorSpec("y", (-1, 4), np.dtype(np.float32)),)
        self._device = device or self.default_device

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [arrays[0] * np.float32(self.scale)]


@pytest.fixture
def toy() -> Iterator[type[ToyRuntime]]:
    register(ToyRuntime)
    try:
        yield ToyRuntime
    finally:
        unregister(ToyRuntime.name)


@pytest.fixture
def x86(tmp_path: Path) -> HardwareProfile:
    return detect(hardware_trees.plain_x86(tmp_path / "hw"))


def test_registered_runtime_is_known_and_probed(toy: type[ToyRuntime]) -> None:
    assert get_runtime("toy") is toy and runtime_classes()["toy"] is toy
    assert probe_all()["toy"] == ProbeResult("toy", True, "0.1", ("CPU", "TOY"))
    assert probe_all(["onnx"])["toy"].reason == "not enabled in the settings (runtime.enabled)"


def test_registered_runtime_is_ranked_by_its_own_tiers(toy: type[ToyRuntime], x86: HardwareProfile, tmp_path: Path) -> None:
    probes = {"toy": toy.probe(), "onnx": ProbeResult("onnx", True, "1.20", ("CPU",))}
    variants = [
        ModelVariant(path=tmp_path / "m.onnx", format="onnx"),
        ModelVariant(path=tmp_path / "m_int8.onnx", format="onnx", precision="int8"),
    ]
    ranking = rank(x86, probes, variants)
    assert [(c.runtime, c.variant.path.name) for c in ranking.candidates] == [
        ("toy", "m_int8.onnx"),
        ("toy", "m.onnx"),
        ("onnx", "m.onnx"),
        ("onnx", "m_int8.onnx"),
    ]
    assert ranking.candidates[0].reason == "toy: ahead of every CPU runtime; int8"
    forced = rank(x86, probes, variants, force_runtime="toy")
    assert {(c.runtime, c.device) for c in forced.candidates} == {("toy", "TOY")}  # its declared default device
    assert preferred_variants(x86, probes)[:2] == ["onnx-int8", "onnx-fp32"]


def test_registered_runtime_is_selected_with_the_profile_passed_in(toy: type[ToyRuntime], x86: HardwareProfile, tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"not really onnx: the toy never reads it")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    golden = GoldenSample({"x": x}, {"y": 3 * x})
    sel, _ = choose(x86, probe_all(), [ModelVariant(path=tmp_path / "m.onnx", format="onnx")], [golden], options={"toy": {"scale": 3}})
    assert sel.candidate.runtime == "toy" and isinstance(sel.runtime, ToyRuntime)
    assert toy.loaded_with is x86  # handed the caller's profile, not detecting the hardware itself
    np.testing.assert_array_equal(sel.runtime.infer({"x": x})["y"], 3 * x)
    sel.runtime.close()


def test_registered_runtime_gets_its_settings_section(toy: type[ToyRuntime], tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[runtime]\nforce_runtime = "toy"\nenabled = ["toy", "onnx"]\n[runtime.options.toy]\nscale = 2.5\n')
    settings = load_settings(config)
    assert settings.runtime.force_runtime == "toy" and settings.runtime.options == {"toy": {"scale": 2.5}}
    config.write_text("[runtime.options.toy]\nscael = 2.5\n")
    with pytest.raises(InvalidOptions, match="toy options: scael"):
        load_settings(config)


def test_unregistered_runtime_is_refused_by_the_settings(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[runtime]\nenabled = ["toy"]\n')
    with pytest.raises(InvalidOptions, match="unknown runtime 'toy'; known: litert, onnx, openvino, tensorrt"):
        load_settings(config)


def test_registered_runtime_is_preferred_by_the_fleet(toy: type[ToyRuntime]) -> None:
    device = Device("cam-1", runtimes={"onnx": "1.20", "toy": "0.1"})  # an agent that does not report its preference
    assert pick_variant(["onnx-fp32", "onnx-int8"], device) == "onnx-int8"  # the toy's first choice, tried before onnx's
    device.runtimes.pop("toy")
    assert pick_variant(["onnx-fp32", "onnx-int8"], device) == "onnx-fp32"


def test_the_registry_imports_no_backend_library() -> None:
    code = (
        "import sys, agent.selection, agent.settings, fleet.rollout; from agent.runtimes import runtime_classes; runtime_classes();"
        "print(sorted(m for m in ('onnxruntime', 'openvino', 'tensorrt', 'ai_edge_litert', 'tflite_runtime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert out == "[]"
