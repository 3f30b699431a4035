"""TensorRT: the engine-cache key logic runs everywhere; the engine build needs an NVIDIA GPU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ModelFiles

from agent.errors import ModelLoadError, RuntimeUnavailable
from agent.runtimes import get_runtime
from agent.runtimes.tensorrt import EngineCache, EngineKey, TensorRTOptions, TensorRTRuntime, sha256_file

KEY = EngineKey(
    onnx_sha256="ab" * 32,
    tensorrt_version="10.3.0",
    gpu_name="Orin (nvgpu)",
    compute_capability="8.7",
    precision="fp16",
    l4t_release="36.3.0",
    profiles=(("x", (1, 64), (1, 64), (8, 64)),),
)


def test_key_is_stable_and_every_field_matters() -> None:
    assert KEY.digest() == dataclasses.replace(KEY).digest()
    changes = {
        "onnx_sha256": "cd" * 32,
        "tensorrt_version": "10.4.0",
        "gpu_name": "NVIDIA L4",
        "compute_capability": "8.9",
        "precision": "int8",
        "l4t_release": "35.4.1",
        "profiles": (("x", (1, 64), (4, 64), (16, 64)),),
    }
    digests = {KEY.digest()}
    for field, value in changes.items():
        digests.add(dataclasses.replace(KEY, **{field: value}).digest())
    assert len(digests) == len(changes) + 1
    assert dataclasses.replace(KEY, l4t_release=None).digest() != KEY.digest()  # dGPU vs Jetson never share


def test_cache_round_trip_and_corruption(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    assert cache.get(KEY) is None
    blob = b"\x01engine" * 1000
    path = cache.put(KEY, blob)
    assert path.name == f"{KEY.digest()}.engine"
    assert cache.get(KEY) == blob
    assert cache.get(dataclasses.replace(KEY, precision="fp32")) is None
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["key"]["gpu_name"] == "Orin (nvgpu)" and meta["size"] == len(blob)
    path.write_bytes(blob[:-1])  # truncated on disk: treated as absent, rebuilt by the runtime
    assert cache.get(KEY) is None
    path.with_suffix(".json").write_text("{not json")
    assert cache.get(KEY) is None
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_profiles_from_the_model_inputs() -> None:
    opts = TensorRTOptions(opt_batch=2, max_batch=16)
    profiles = TensorRTRuntime._profiles([("x", (-1, 64)), ("static", (1, 3))], opts)
    assert profiles == (("x", (1, 64), (2, 64), (16, 64)),)
    with pytest.raises(ModelLoadError, match="dynamic dims beyond the batch"):
        TensorRTRuntime._profiles([("img", (-1, 3, -1, -1))], opts)
    explicit = TensorRTOptions(profiles={"img": ([1, 3, 32, 32], [1, 3, 224, 224], [4, 3, 512, 512])})
    assert TensorRTRuntime._profiles([("img", (-1, 3, -1, -1))], explicit)[0][3] == (4, 3, 512, 512)


def test_sha256_file(tmp_path: Path) -> None:
    import hashlib

    (tmp_path / "f").write_bytes(b"x" * 3_000_000)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(b"x" * 3_000_000).hexdigest()


_PROBE = TensorRTRuntime.probe()


def test_load_says_why_when_tensorrt_cannot_run(models: ModelFiles, tmp_path: Path) -> None:
    rt = get_runtime("tensorrt")()
    if _PROBE.available:  # a GPU machine: loading works (the GPU test checks the answers)
        rt.load(models.path("mlp.onnx"), options={"cache_dir": str(tmp_path), "precision": "fp32"})
        rt.close()
        return
    with pytest.raises(RuntimeUnavailable, match="tensorrt is not available here"):
        rt.load(models.path("mlp.onnx"))


@pytest.mark.skipif(not _PROBE.available, reason=f"needs an NVIDIA GPU with TensorRT: {_PROBE.reason}")
def test_engine_build_cache_and_inference_on_gpu(models: ModelFiles, tmp_path: Path) -> None:
    opts = {"cache_dir": str(tmp_path / "engines"), "precision": "fp32", "max_batch": 8}
    x = models.calibration[:5]
    with get_runtime("tensorrt")() as rt:
        rt.load(models.path("mlp.onnx"), options=opts)
        assert rt.describe().details["engine_built"] is True
        np.testing.assert_allclose(rt.infer({"x": x})["y"], models.mlp.reference(x), rtol=1e-3, atol=1e-3)
    with get_runtime("tensorrt")() as rt:
        rt.load(models.path("mlp.onnx"), options=opts)
        assert rt.describe().details["engine_built"] is False  # from the cache
        np.testing.assert_allclose(rt.infer({"x": x[:1]})["y"], models.mlp.reference(x[:1]), rtol=1e-3, atol=1e-3)
    with get_runtime("tensorrt")() as rt:
        rt.load(models.path("add_mul.onnx"), options=opts)
        a, b = np.ones((3, 4), np.float32), np.full((3, 4), 2.0, np.float32)
        out = rt.infer({"a": a, "b": b})
        np.testing.assert_allclose(out["sum"], a + b)
        np.testing.assert_allclose(out["product"], a * b)
