"""Shared fixtures: a real MQTT broker, real model files built by the tests, and a store in SQLite or in a fresh PostgreSQL database."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters import builders
from fleet.dev.broker import RunningBroker, start_broker


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """mosquitto on a free port (amqtt where mosquitto is missing, or with EDGEFLEET_TEST_BROKER=amqtt)."""
    prefer = "amqtt" if os.environ.get("EDGEFLEET_TEST_BROKER") == "amqtt" else "mosquitto"
    broker = start_broker(tmp_path_factory.mktemp("broker"), prefer=prefer)  # type: ignore[arg-type]
    yield broker
    broker.stop()


# PostgreSQL is part of this machine's test set-up: 127.0.0.1:5432, user postgres, trust auth (CI installs it too).
POSTGRES_ADMIN = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """A new, empty database (edgefleet_test_<random>) and its URL; dropped afterwards, connections and all.
    PostgreSQL not answering fails the test (it is part of the set-up, not an optional extra)."""
    import psycopg

    name = f"edgefleet_test_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN} (user postgres, trust auth) is part of the test set-up and did not answer: {exc}")
    try:
        yield POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | str]:
    """Where a test's store lives: a SQLite file, or a fresh PostgreSQL database (the same tests run on both)."""
    if request.param == "sqlite":
        yield tmp_path / "fleet.db"
        return
    with fresh_postgres() as url:
        yield url


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


@pytest.fixture(scope="module")
def rig(models: ModelFiles, mqtt_broker: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Keys, both repositories and a repository server on the session broker; mlp 1.0.0 and 1.1.0 released."""
    from update_rig import Rig

    r = Rig(tmp_path_factory.mktemp("fleet"), models.path("mlp.onnx"), mqtt_broker)
    for version in ("1.0.0", "1.1.0"):
        r.release(version)
    r.controller.server.start()
    yield r
    r.controller.server.stop()


@pytest.fixture(autouse=True)
def _no_agent_outlives_its_test() -> Iterator[None]:
    """A failed test must not leave an `edge-agent run` behind (it would hold a device id on the broker)."""
    yield
    from update_rig import AgentProcess

    for proc in AgentProcess.running:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)
    AgentProcess.running.clear()
