"""Models this project did not make, end to end: silero-vad's voice-activity ONNX as its PyPI wheel ships it; a
stateful model shaped like it, built here with onnx.helper; float TFLite exported from Keras CNNs as published vision
models are (a segmentation mask decoded by a transposed convolution with bias; a landmark regression with a score).

Each goes the whole way a user's model goes: ``edge-agent infer`` on the bare file, ``fleet build`` with real
calibration samples and the state's batch axis (no ``--drop-failing``), a signed release, the director's assignment, a
real agent that installs it (its health check runs the golden samples: a 0-d sample rate and a state stacked on dim 1)
and serves it over MQTT to an unmodified paho client sending plain JSON, the sample rate a bare number. Every answer is
compared with plain onnxruntime (or LiteRT's own signature runner) on the same inputs.

silero-vad is installed by the set-up (README: "Set up") only for this test; nothing of ours imports it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest
import wild_models
from update_rig import Rig, wait_for

from agent.bundle import load_bundle
from agent.daemon import Agent
from agent.settings import load_settings
from agent.wire import ROOT
from fleet.dev.broker import RunningBroker
from fleet.transport.announce import announce


def silero_vad(_: Path) -> Path:
    """The model file inside the installed silero-vad wheel: a published model, not one of ours."""
    spec = importlib.util.find_spec("silero_vad")
    assert spec is not None and spec.submodule_search_locations, "silero-vad is part of the set-up (README: Set up)"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"


def silero_samples(count: int = 24, length: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """Tones with noise at 16 kHz, silero's chunk length; a zero state stacked on dim 1; the sample rate 0-d."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / 16000
    freq = rng.uniform(150, 1500, (count, 1))
    audio = (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal((count, length))).astype(np.float32)
    return {"input": audio, "state": np.zeros((2, count, 128), np.float32), "sr": np.array(16000, np.int64)}


def stateful(root: Path) -> Path:
    return wild_models.write_stateful_onnx(root / "stateful.onnx")


def image_samples() -> dict[str, np.ndarray]:
    return {"image": wild_models.images()}


@dataclass(frozen=True)
class Case:
    """One model from the wild: how to get it, realistic samples, the variant a device runs, and how to build it."""

    make: Callable[[Path], Path]
    samples: Callable[[], dict[str, np.ndarray]]
    variant: str = "onnx-fp32"
    build_args: tuple[str, ...] = ("--batch-axis", "state=1")


def keras(name: str) -> Callable[[Path], Path]:
    """A float TFLite exported from a Keras CNN (TensorFlow in a child process), as published vision models are."""
    return lambda root: wild_models.write_keras_tflite(root)[name]


CASES = {
    "silero-vad": Case(silero_vad, silero_samples),
    "stateful": Case(stateful, wild_models.stateful_samples),
    "segmentation": Case(keras("segmentation"), image_samples, "tflite-fp32", ()),  # a transposed convolution, a mask
    "regression": Case(keras("regression"), image_samples, "tflite-fp32", ()),  # landmarks in pixels and a score
}


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(tool) or str(Path(sys.executable).with_name(tool))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600)


def reference(model: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Plain onnxruntime, or LiteRT's own signature runner, one sample at a time where the file fixes batch 1: the
    answer every path must give."""
    if model.suffix == ".onnx":
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(model)).get_signature_runner()
    ((name, batch),) = inputs.items()
    answers = [runner(**{name: batch[i : i + 1]}) for i in range(len(batch))]
    return {k: np.concatenate([a[k] for a in answers]) for k in answers[0]}


def first(samples: dict[str, np.ndarray], axes: dict[str, int | None], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples, cut along each input's own batch axis (a 0-d input has none)."""
    return {k: v if axes[k] is None else np.take(v, range(n), axis=axes[k]) for k, v in samples.items()}


class PahoApp:
    """An application that knows nothing of edgefleet's Python: paho, JSON, the documented topics."""

    def __init__(self, broker: RunningBroker) -> None:
        self.replies: dict[str, dict[str, Any]] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"app-{uuid.uuid4().hex[:8]}")
        self.client.on_message = lambda c, u, msg: self.replies.__setitem__(json.loads(msg.payload)["request_id"], json.loads(msg.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def ask(self, device: str, model: str, body: str, request_id: str) -> dict[str, Any]:
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.subscribe(f"{ROOT}/dev/{device}/pred/{model}", qos=1)  # no reply_to: answers go to pred/{model}
        assert subscribed.wait(10), "the broker did not acknowledge the subscription"
        self.client.publish(f"{ROOT}/dev/{device}/infer/{model}/voiceapp", body, qos=1)
        return wait_for(lambda: self.replies.get(request_id), 30, f"the answer to {request_id}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.parametrize("name", list(CASES))
def test_a_model_from_the_wild_runs_builds_installs_and_serves(name: str, tmp_path: Path, rig: Rig, mqtt_broker: RunningBroker) -> None:
    case = CASES[name]
    model = case.make(tmp_path)
    samples = case.samples()
    axes = {k: (None if v.ndim == 0 else 1 if k == "state" else 0) for k, v in samples.items()}

    # 1. the bare file, on the inputs given: warm-up uses them, so the reflect Pad never sees a length-1 input
    one = first(samples, axes, 1)
    np.savez(tmp_path / "one.npz", **one)
    runtime = "onnx" if model.suffix == ".onnx" else "litert"
    done = run(
        "edge-agent", "infer", str(model), "--input", str(tmp_path / "one.npz"), "--runtime", runtime, "--output", str(tmp_path / "o.npz")
    )
    assert done.returncode == 0, done.stderr
    want = reference(model, one)
    with np.load(tmp_path / "o.npz") as got:
        for out in want:
            np.testing.assert_allclose(got[out], want[out], atol=1e-5)

    # 2. fleet build with real calibration samples and the state's batch axis, without --drop-failing
    np.savez(tmp_path / "samples.npz", **samples)
    bundle_dir = tmp_path / "bundle"
    built = run(
        "fleet", "build", str(model), "--name", name, "--version", "1.0.0", "--out", str(bundle_dir),
        "--samples", str(tmp_path / "samples.npz"), *case.build_args,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    bundle = load_bundle(bundle_dir)
    assert {t.name: t.batch_axis for t in bundle.inputs} == axes
    assert case.variant in {v.id for v in bundle.variants}
    for vid, why in bundle.skipped.items():  # every variant not kept says why; none failed the build
        assert why.reason, vid

    # 3. signed, assigned, installed by a real agent whose health check runs the golden samples
    rig.image.release(bundle_dir, rig.keys)  # the session's repositories and repository server
    device = f"wild-{name}"
    agent = Agent(load_settings(rig.write_config(device))).start()
    app = PahoApp(mqtt_broker)
    try:
        assert agent.wait_connected()
        rig.director.assign(device, rig.image, name, "1.0.0", case.variant, rig.keys)
        announce(rig.director, [device], mqtt_broker.host, mqtt_broker.port)
        wait_for(lambda: agent.host.get(name) is not None, 120, f"{name} installed")

        # 4. served to plain JSON over MQTT: nested lists, the sample rate a bare number
        two = first(samples, axes, 2 if model.suffix == ".onnx" else 1)  # the Keras exports fix batch 1
        body = json.dumps({"request_id": "q1", "inputs": {k: (int(v) if v.ndim == 0 else v.tolist()) for k, v in two.items()}})
        reply = app.ask(device, name, body, "q1")
        assert "error" not in reply, reply
        assert reply["version"] == "1.0.0"
        want = reference(model, two)
        for out in want:
            np.testing.assert_allclose(np.asarray(reply["outputs"][out], np.float32), want[out], atol=1e-4)
    finally:
        app.close()
        agent.stop()


def test_silero_vad_runs_with_the_bounded_spin_and_answers_as_plain_onnxruntime(tmp_path: Path) -> None:
    """The published silero-vad model on the agent's ONNX Runtime with its default threading (two workers, a bounded
    spin): the session is built with the spin the plan names, and a stream of calls answers what plain onnxruntime,
    whose workers never spin, answers."""
    from agent.runtimes import get_runtime
    from agent.runtimes.onnx import OnnxOptions, spin_plan

    path = silero_vad(tmp_path)
    rt = get_runtime("onnx")()
    rt.load(path, options={"intra_op_threads": 2})
    planned = spin_plan(OnnxOptions(), ort.__version__)
    built = rt._session.get_session_options()  # type: ignore[attr-defined]
    assert built.get_session_config_entry("session.intra_op.allow_spinning") == planned.entries["session.intra_op.allow_spinning"]
    assert rt.describe().details["spin"] == planned.said
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for seed in range(20):
        one = silero_samples(1, seed=seed)
        ours = rt.infer(one)
        want = plain.run(None, one)
        for name, expected in zip(rt.describe().to_json()["outputs"], want):
            np.testing.assert_allclose(ours[name["name"]], expected, rtol=1e-5, atol=1e-6)
    rt.close()
