"""`edge-agent infer` and `edge-agent hardware` as an operator runs them: real processes, real files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ModelFiles

from agent import commands
from agent.errors import InvalidInput, MissingInput


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("edge-agent") or str(Path(sys.executable).with_name("edge-agent"))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=180)


def test_infer_npy_json_output(models: ModelFiles, tmp_path: Path) -> None:
    x = models.calibration[:2]
    np.save(tmp_path / "x.npy", x)
    done = edge_agent("infer", str(models.path("mlp.onnx")), "--input", str(tmp_path / "x.npy"), "--json", "--repeat", "3")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    np.testing.assert_allclose(np.array(result["outputs"]["y"]), models.mlp.reference(x), rtol=1e-4, atol=1e-4)
    assert result["latency_ms"]["runs"] == 3 and result["latency_ms"]["median"] > 0
    assert result["model"]["runtime"] == "onnx"


def test_infer_npz_named_inputs_forced_runtime(models: ModelFiles, tmp_path: Path) -> None:
    a, b = np.ones((2, 4), np.float32), np.full((2, 4), 3.0, np.float32)
    np.savez(tmp_path / "in.npz", a=a, b=b)
    done = edge_agent(
        "infer", str(models.path("add_mul.onnx")), "--input", str(tmp_path / "in.npz"), "--runtime", "openvino", "--device", "CPU", "--json"
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["model"]["runtime"] == "openvino"
    assert result["outputs"]["sum"] == [[4.0] * 4] * 2 and result["outputs"]["product"] == [[3.0] * 4] * 2


def test_infer_json_human_output(models: ModelFiles, tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"x": [[1, 2, 3, 4]]}))
    done = edge_agent("infer", str(models.path("tiny.tflite")), "--input", str(tmp_path / "x.json"))
    assert done.returncode == 0, done.stderr
    assert "litert" in done.stdout and "latency: first" in done.stdout
    assert re.search(r"^y: shape \[1, \d+\] float32  min \S+ max \S+ mean \S+  first \[", done.stdout, re.M), done.stdout


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b"{not json", "x.json", "cannot parse x.json"),
        (b"\x93NUMPY garbage", "x.npy", "cannot parse x.npy"),
        (b"PK\x03\x04 broken zip", "x.npz", "cannot parse x.npz"),
        (b"1,2,3", "x.csv", "must be .npy, .npz or .json"),
        (json.dumps({"x": [[1, 2, 3]]}).encode(), "x.json", r"expected shape \[\?x4\], got \[1, 3\]"),
        (json.dumps({"x": [[1, None, 3, 4]]}).encode(), "x.json", "expected numbers"),
        (json.dumps({"x": [["1", "2", "3", "4"]]}).encode(), "x.json", "expected numbers"),
        (json.dumps({"z": [[1, 2, 3, 4]]}).encode(), "x.json", "unknown input 'z'"),
    ],
)
def test_infer_bad_input_files(models: ModelFiles, tmp_path: Path, content: bytes, name: str, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    done = edge_agent("infer", str(models.path("tiny.onnx")), "--input", str(tmp_path / name))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error[" in done.stderr
    import re

    assert re.search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr


def test_infer_bad_model_files(models: ModelFiles, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    done = edge_agent("infer", str(tmp_path / "missing.onnx"), "--input", str(tmp_path / "x.npy"))
    assert done.returncode == 1 and "error[model_load_failed]: model file not found" in done.stderr
    (tmp_path / "bad.tflite").write_bytes(models.path("tiny.tflite").read_bytes()[:40])
    done = edge_agent("infer", str(tmp_path / "bad.tflite"), "--input", str(tmp_path / "x.npy"))
    assert done.returncode == 1 and "error[no_usable_runtime]" in done.stderr
    assert "litert:CPU tflite/fp32" in done.stderr and "openvino:CPU tflite/fp32" in done.stderr  # each fallback's reason
    assert "Traceback" not in done.stderr
    done = edge_agent("infer", str(models.path("tiny.onnx")), "--input", str(tmp_path / "x.npy"), "--runtime", "nonsense")
    assert done.returncode == 1 and "unknown runtime 'nonsense'" in done.stderr


def test_python_api_matches_the_cli(models: ModelFiles) -> None:
    x = np.ones((1, 4), np.float32)
    result = commands.infer(models.path("tiny.xml"), {"x": x})
    np.testing.assert_allclose(result.outputs["y"], models.tiny.reference(x), rtol=1e-5)
    assert result.description.runtime == "openvino"
    with pytest.raises(MissingInput, match=r"inputs \['a', 'b'\]"):
        commands.infer(models.path("add_mul.onnx"), x)
    report = commands.hardware()
    assert report.ranking.candidates and report.to_json()["profile"]["arch"]


def test_oversized_input_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "MAX_INPUT_FILE_BYTES", 1000)
    np.save(tmp_path / "big.npy", np.zeros(1000, np.float32))
    with pytest.raises(InvalidInput, match="the limit is 1000"):
        commands.load_inputs(tmp_path / "big.npy")


def test_hardware_human_output() -> None:
    done = edge_agent("hardware")
    assert done.returncode == 0, done.stderr
    assert "ranking (best first)" in done.stdout and "openvino" in done.stdout
