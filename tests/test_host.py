"""The model host hot-swaps under load: a request in flight on the old model finishes on it, and the old model is closed
only after that, whoever waits (a swap, a shadow taken for promotion)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from update_rig import wait_for

from agent.runtimes import get_runtime
from agent.serve.host import ModelHost, ServingModel
from converters import builders

WIDTHS = [1024, 1024, 1024, 1024, 10]


def _model(path: Path, version: str) -> ServingModel:
    rt = get_runtime("onnx")()
    rt.load(path)
    rt.warmup()
    return ServingModel("m", version, "onnx-fp32", "0" * 64, rt)


def test_a_swap_waits_for_the_request_in_flight_then_closes_the_old_model(tmp_path: Path) -> None:
    mlp = builders.random_mlp(WIDTHS, seed=0)
    path = builders.write_onnx_mlp(mlp, tmp_path / "m.onnx")
    host = ModelHost()
    old, new = _model(path, "1"), _model(path, "2")
    host.swap(old)
    x = np.random.default_rng(0).uniform(-1, 1, (512, WIDTHS[0])).astype(np.float32)  # a call of tens of milliseconds
    answers: list[np.ndarray] = []
    errors: list[BaseException] = []

    def slow_request() -> None:
        try:
            for _ in range(20):  # keep the old model busy until the swap has begun waiting
                answers.append(host.infer("m", {"x": x})["y"])
        except BaseException as exc:  # the test reports any failure
            errors.append(exc)

    worker = threading.Thread(target=slow_request)
    worker.start()
    wait_for(lambda: old.inflight == 1, 30, "a call in flight on the old model")
    t0 = time.monotonic()
    replaced = host.swap(new, drain_timeout=60.0)
    assert time.monotonic() - t0 < 10.0  # woken when the call ended, not at the drain's timeout
    assert replaced is old
    assert old.inflight == 0  # the swap returned only once the old model's call had ended
    worker.join(60)
    assert errors == [], errors  # no request saw the old model closed under it
    np.testing.assert_allclose(answers[0], mlp.reference(x), rtol=1e-3, atol=1e-3)
    assert host.get("m") is new
    assert host.infer("m", {"x": x[:1]})["y"].shape == (1, 10)
    host.close()


def test_taking_a_shadow_waits_for_its_call_in_flight(tmp_path: Path) -> None:
    path = builders.write_onnx_mlp(builders.random_mlp(WIDTHS, seed=1), tmp_path / "s.onnx")
    host = ModelHost()
    host.swap(_model(path, "1"))
    shadow = _model(path, "2")
    host.set_shadow(shadow)
    x = np.ones((512, WIDTHS[0]), np.float32)
    done = threading.Event()

    def shadow_calls() -> None:
        while not done.is_set():
            if host.infer_shadow("m", "2", {"x": x}) is None:
                return

    worker = threading.Thread(target=shadow_calls)
    worker.start()
    wait_for(lambda: shadow.inflight == 1, 30, "a call in flight on the shadow")
    taken = host.take_shadow("m", "0" * 64)
    assert taken is shadow and shadow.inflight == 0
    done.set()
    worker.join(60)
    assert host.shadow("m") is None
    host.close()
    shadow.runtime.close()
