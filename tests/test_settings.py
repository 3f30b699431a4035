"""Settings: TOML file + EDGEFLEET_* environment; a forced runtime in the settings wins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ModelFiles

from agent import commands
from agent.errors import InvalidOptions, NoUsableRuntime
from agent.settings import load_settings


def toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file(tmp_path: Path) -> None:
    s = load_settings(tmp_path / "absent.toml")
    assert s.runtime.force_runtime is None and s.hardware_root == Path("/")


def test_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = toml(tmp_path, '[runtime]\nforce_runtime = "litert"\nforce_device = "CPU"\n[runtime.options.litert]\nnum_threads = 1\n')
    s = load_settings(path)
    assert s.runtime.force_runtime == "litert" and s.runtime.options == {"litert": {"num_threads": 1}}
    monkeypatch.setenv("EDGEFLEET_RUNTIME__FORCE_RUNTIME", "onnx")
    assert load_settings(path).runtime.force_runtime == "onnx"  # the environment overrides the file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[runtime]\nforce_runtime = "pytorch"\n', "runtime.force_runtime='pytorch'"),
        ("typo = 1\n", "typo=1: Extra inputs are not permitted"),
        ('[runtime]\nlatency_budget_ms = "fast"\n', "runtime.latency_budget_ms='fast'"),
        ("[runtime\nforce", "settings file .*agent.toml"),
        ("\x00\x01\x02", "settings file"),
    ],
)
def test_bad_settings_name_the_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidOptions, match=message):
        load_settings(toml(tmp_path, text))


def test_forced_runtime_from_settings_wins(models: ModelFiles, tmp_path: Path) -> None:
    settings = load_settings(toml(tmp_path, '[runtime]\nforce_runtime = "openvino"\nforce_device = "CPU"\n'))
    x = np.ones((1, 4), np.float32)
    result = commands.infer(models.path("tiny.onnx"), {"x": x}, settings=settings)
    assert result.description.runtime == "openvino"  # the policy alone would pick onnxruntime for an .onnx file here
    assert commands.infer(models.path("tiny.onnx"), {"x": x}, runtime="onnx", settings=settings).description.runtime == "onnx"


def test_runtime_options_are_validated_when_settings_load(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptions, match="intra_op_thread"):
        load_settings(toml(tmp_path, "[runtime.options.onnx]\nintra_op_thread = 1\n"))
    with pytest.raises(InvalidOptions, match="unknown runtime 'pytorch'"):
        load_settings(toml(tmp_path, "[runtime.options.pytorch]\nx = 1\n"))
    ok = load_settings(toml(tmp_path, "[runtime.options.onnx]\nintra_op_threads = 1\n"))
    assert ok.runtime.options == {"onnx": {"intra_op_threads": 1}}


def test_forced_runtime_that_cannot_load_is_not_replaced(models: ModelFiles, tmp_path: Path) -> None:
    settings = load_settings(toml(tmp_path, '[runtime]\nforce_runtime = "litert"\n'))
    why = r"litert: litert reads \.tflite; this model is \.onnx; runtimes that read \.onnx: onnx, openvino, tensorrt"
    with pytest.raises(NoUsableRuntime, match=why):
        commands.infer(models.path("tiny.onnx"), {"x": np.ones((1, 4), np.float32)}, settings=settings)


def test_cli_config_option(models: ModelFiles, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    cfg = toml(tmp_path, '[runtime]\nforce_runtime = "openvino"\n')
    cmd = [sys.executable, "-m", "agent.cli", "infer", str(models.path("tiny.onnx")), "--input", str(tmp_path / "x.npy")]
    done = subprocess.run([*cmd, "--config", str(cfg), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"]["runtime"] == "openvino"
    bad = toml(tmp_path, '[runtime]\nforce_runtime = "pytorch"\n')
    done = subprocess.run([*cmd, "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "runtime.force_runtime='pytorch'" in done.stderr
