"""Shared fixtures: a real MQTT broker and real model files built by the tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from converters import builders
from fleet.broker import RunningBroker, start_broker


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """mosquitto on a free port (amqtt where mosquitto is missing, or with EDGEFLEET_TEST_BROKER=amqtt)."""
    prefer = "amqtt" if os.environ.get("EDGEFLEET_TEST_BROKER") == "amqtt" else "mosquitto"
    broker = start_broker(tmp_path_factory.mktemp("broker"), prefer=prefer)  # type: ignore[arg-type]
    yield broker
    broker.stop()


@dataclass(frozen=True)
class ModelFiles:
    """Every test model in every format, with the numpy truth for each."""

    root: Path
    tiny: builders.Mlp
    mlp: builders.Mlp
    calibration: np.ndarray

    def path(self, name: str) -> Path:
        return self.root / name


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    root = tmp_path_factory.mktemp("models")
    tiny = builders.random_mlp([4, 4], seed=1)  # one dense layer over 4 floats
    mlp = builders.random_mlp([64, 128, 128, 10], seed=2)
    calibration = np.random.default_rng(3).uniform(-1, 1, (256, 64)).astype(np.float32)
    for name, m in (("tiny", tiny), ("mlp", mlp)):
        builders.write_onnx_mlp(m, root / f"{name}.onnx")
        builders.write_tflite_mlp(m, root / f"{name}.tflite")
        builders.write_openvino_ir(root / f"{name}.onnx", root / f"{name}.xml")
    builders.write_onnx_mlp(mlp, root / "mlp_static.onnx", batch=1)
    builders.write_tflite_mlp(mlp, root / "mlp_int8.tflite", int8_calibration=calibration)
    builders.write_onnx_add_mul(root / "add_mul.onnx")
    builders.write_tflite_add_mul(root / "add_mul.tflite")
    builders.write_openvino_ir(root / "add_mul.onnx", root / "add_mul.xml")
    return ModelFiles(root, tiny, mlp, calibration)
