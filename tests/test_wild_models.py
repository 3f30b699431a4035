"""Models shaped like published ones, on the agent: a voice-activity ONNX with a 0-d int64 sample rate, a state batched on
dim 1 and a reflect Pad that refuses short inputs — through ``edge-agent infer``, warm-up, OpenVINO and MQTT serving."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from update_rig import MODEL, Rig, wait_for
from wild_onnx import voice_activity, voice_inputs

from agent import commands
from agent.cli import main
from agent.client import EdgeClient
from agent.daemon import Agent
from agent.errors import InvalidInput, InvalidOptions, ModelLoadError, ShapeMismatch, WarmupFailed
from agent.hardware import detect
from agent.runtimes import get_runtime
from agent.runtimes.hints import SYNTHETIC_SIZES, InputHints
from agent.selection import Candidate, ModelVariant, select
from agent.serve.host import ServingModel
from agent.settings import load_settings
from agent.wire.inference import Reply, encode_reply
from fleet.dev.broker import RunningBroker


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("edge-agent") or str(Path(sys.executable).with_name("edge-agent"))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def vad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return voice_activity(tmp_path_factory.mktemp("wild") / "vad.onnx")


def reference(model: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Plain onnxruntime, nothing of ours."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))


def test_plain_onnxruntime_refuses_one_sample_so_a_warm_up_with_ones_would_fail(vad: Path) -> None:
    with pytest.raises(Exception, match="Pad"):
        reference(vad, voice_inputs(1, 1))


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_infer_runs_the_model_on_the_inputs_given_and_matches_onnxruntime(vad: Path, tmp_path: Path, runtime: str) -> None:
    inputs = voice_inputs(1, 512, seed=3)
    np.savez(tmp_path / "in.npz", **inputs)
    done = edge_agent("infer", str(vad), "--input", str(tmp_path / "in.npz"), "--runtime", runtime, "--output", str(tmp_path / "out.npz"))
    assert done.returncode == 0, done.stderr
    want = reference(vad, inputs)
    with np.load(tmp_path / "out.npz") as got:
        assert set(got.files) == {"output", "stateN"}
        np.testing.assert_allclose(got["output"], want["output"], atol=1e-5)
        np.testing.assert_allclose(got["stateN"], want["stateN"], atol=1e-5)
    # A summary per output, never the whole tensors.
    assert re.search(r"^output: shape \[1, 1\] float32  min \S+ max \S+ mean \S+  first \[[-0-9.e]+\]$", done.stdout, re.M), done.stdout
    assert re.search(r"^stateN: shape \[2, 1, 128\] float32 .* first \[([-0-9.e]+, ){5}\.\.\.\]$", done.stdout, re.M), done.stdout
    assert len(done.stdout) < 1000

    full = edge_agent("infer", str(vad), "--input", str(tmp_path / "in.npz"), "--runtime", runtime, "--json")
    assert full.returncode == 0, full.stderr
    data = json.loads(full.stdout)
    np.testing.assert_allclose(np.asarray(data["outputs"]["stateN"]), want["stateN"], atol=1e-5)  # --json stays complete
    specs = {t["name"]: t for t in data["model"]["inputs"]}
    assert specs["sr"]["shape"] == [] and specs["sr"]["batch_axis"] is None
    if runtime == "openvino":  # read_model refuses the If of dynamic rank: converted with the shapes of the inputs given
        converted = data["model"]["details"]["converted"]
        assert converted["shapes"] == {"input": [1, 512], "state": [2, 1, 128], "sr": []} and "read_model refused" in converted["why"]
    else:
        assert specs["state"]["batch_axis"] == 1 and specs["input"]["batch_axis"] == 0  # inferred from the shapes
        assert data["model"]["details"]["warmup_inputs"].startswith("the first sample given")


def test_a_wrong_input_is_exit_2_naming_it_before_any_warm_up(vad: Path, tmp_path: Path) -> None:
    bad = voice_inputs(1, 512)
    bad["state"] = bad["state"][:, :, :5]
    np.savez(tmp_path / "bad.npz", **bad)
    done = edge_agent("infer", str(vad), "--input", str(tmp_path / "bad.npz"), "--runtime", "onnx")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "input 'state': expected shape [2x?x128], got [2, 1, 5]" in done.stderr

    short = voice_inputs(1, 512)
    short["sr"] = np.array([16000, 8000])  # a 0-d input given as a vector
    np.savez(tmp_path / "short.npz", **short)
    done = edge_agent("infer", str(vad), "--input", str(tmp_path / "short.npz"), "--runtime", "onnx")
    assert done.returncode == 2 and "input 'sr': expected shape [], got [2]" in done.stderr, done.stderr

    done = edge_agent("infer", str(vad), "--input", str(tmp_path / "bad.npz"), "--runtime", "onnx", "--batch-axis", "nope=1")
    assert done.returncode == 2  # the input is checked first; a good one with a misspelt --batch-axis is refused too
    np.savez(tmp_path / "good.npz", **voice_inputs(1, 512))
    done = edge_agent("infer", str(vad), "--input", str(tmp_path / "good.npz"), "--runtime", "onnx", "--batch-axis", "nope=1")
    assert done.returncode == 2 and "--batch-axis nope: the model has no tensor of that name" in done.stderr, done.stderr
    done = edge_agent("infer", str(vad), "--input", str(tmp_path / "good.npz"), "--batch-axis", "state")
    assert done.returncode == 2 and "NAME=K" in done.stderr


def test_a_batch_axis_past_the_tensors_rank_or_not_a_plain_number_is_refused_never_ignored(vad: Path, tmp_path: Path) -> None:
    for axes, why in (({"state": 5}, "'state' has 3 dimensions"), ({"sr": 0}, "'sr' has 0 dimensions"), ({"output": 2}, "'output' has 2")):
        with pytest.raises(InvalidOptions, match=why):
            commands.infer(vad, voice_inputs(1, 512), runtime="onnx", batch_axes=axes)
    np.savez(tmp_path / "good.npz", **voice_inputs(1, 512))
    done = CliRunner().invoke(main, ["infer", str(vad), "--input", str(tmp_path / "good.npz"), "--batch-axis", "state=\u00b2"])
    assert done.exit_code == 2 and "NAME=K" in done.output, done.output  # "²".isdigit() is True, int() refuses it

    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidInput, match="nested too deeply"):
        commands.load_inputs(tmp_path / "deep.json")


def test_a_runtime_that_cannot_read_the_format_says_which_can(vad: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "in.npz", **voice_inputs())
    done = edge_agent("infer", str(vad), "--input", str(tmp_path / "in.npz"), "--runtime", "litert")
    assert done.returncode == 1
    assert "litert reads .tflite; this model is .onnx; runtimes that read .onnx: onnx, openvino, tensorrt" in done.stderr


def test_synthetic_warm_up_tries_realistic_sizes_and_reports_them_when_none_works(vad: Path, tmp_path: Path) -> None:
    rt = get_runtime("onnx")()
    rt.load(vad)  # nothing known of the inputs: synthetic zeros
    rt.warmup()
    assert rt.describe().details["warmup_inputs"] == "synthetic zeros, batch 1, other dynamic dimensions 256"  # 1, 16, 64 refused
    rt.close()

    impossible = voice_activity(tmp_path / "wide.onnx", pad=5000)  # needs more than 5000 samples: no size tried is enough
    rt = get_runtime("onnx")()
    rt.load(impossible)
    with pytest.raises(WarmupFailed) as info:
        rt.warmup()
    message = str(info.value)
    for n in SYNTHETIC_SIZES:
        assert re.search(rf"\b{n}: onnx failed during inference: .*Pad", message), message
    assert "Give real inputs" in message
    rt.close()

    rt = get_runtime("onnx")()
    rt.load(impossible, hints=InputHints((voice_inputs(1, 6000),)))  # the inputs it will see: they work
    rt.warmup()
    rt.close()


def test_openvino_without_shapes_to_convert_with_fails_with_that_reason_and_selection_falls_back(vad: Path) -> None:
    rt = get_runtime("openvino")()
    with pytest.raises(ModelLoadError, match="no input shapes are known to convert it with"):
        rt.load(vad)
    level = logging.getLogger().level
    # Converted with the batch axes left dynamic first; the If on the batch size does not fold then, so with the exact shapes.
    rt.load(vad, hints=InputHints((voice_inputs(2, 400),), {"input": 0, "state": 1}))
    converted = rt.describe().details["converted"]
    assert converted["shapes"] == {"input": [2, 400], "state": [2, 2, 128], "sr": []}
    assert "[2, -1, 128]" in converted["failed_first"][0]
    assert logging.getLogger().level == level  # the converter's TensorFlow set the root logger to ERROR: put back
    want = reference(vad, voice_inputs(2, 400, seed=7))
    np.testing.assert_allclose(rt.infer(voice_inputs(2, 400, seed=7))["stateN"], want["stateN"], atol=1e-5)
    with pytest.raises(ShapeMismatch, match="input 'input': expected shape \\[2x400\\]"):
        rt.infer(voice_inputs(3, 400))
    rt.close()
    variant = ModelVariant.from_path(vad)
    candidates = [Candidate("openvino", "CPU", variant, "test"), Candidate("onnx", "CPU", variant, "test")]
    sel = select(candidates, profile=detect("/"))
    assert sel.candidate.runtime == "onnx" and "no input shapes are known" in sel.attempts[0][1]
    sel.runtime.close()


def test_a_0d_output_is_a_bare_number_in_json() -> None:
    reply = json.loads(encode_reply(Reply("r", "m", "1", {"rate": np.array(16000, np.int64), "p": np.array(0.5, np.float32)})))
    assert reply["outputs"] == {"rate": 16000, "p": 0.5}


# -- serving over MQTT through the real daemon ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def serving_agent(rig: Rig, vad: Path) -> Iterator[Agent]:
    """An agent serving the voice model, with micro-batching on; a wait long enough for two published requests to meet."""
    config = rig.write_config("wild-1")
    config.write_text(config.read_text() + "[serving]\nmicro_batch = 8\nmicro_batch_wait_ms = 300\ninline_below_ms = 0\n")
    agent = Agent(load_settings(config)).start()
    assert agent.wait_connected()
    rig.assign("wild-1", "1.0.0")  # a device the fleet knows, serving the rig's model beside the voice model
    wait_for(lambda: agent.host.get(MODEL) is not None, what="the rig's model installed")
    sel = select([Candidate("onnx", "CPU", ModelVariant.from_path(vad), "test")], hints=InputHints((voice_inputs(),)))
    agent.host.swap(ServingModel("vad", "1.0.0", "onnx-fp32", "0" * 64, sel.runtime))
    yield agent
    agent.stop()


def test_serving_answers_a_json_request_with_a_bare_number_sample_rate(serving_agent: Agent, mqtt_broker: RunningBroker, vad: Path) -> None:
    inputs = voice_inputs(1, 512, seed=5)
    payload = {"input": inputs["input"].tolist(), "state": inputs["state"].tolist(), "sr": 16000}
    with EdgeClient(mqtt_broker.host, mqtt_broker.port) as client:
        out = client.infer("wild-1", "vad", {k: np.asarray(v) for k, v in payload.items()})
    want = reference(vad, inputs)
    np.testing.assert_allclose(out["output"], want["output"], atol=1e-5)
    np.testing.assert_allclose(out["stateN"], want["stateN"], atol=1e-5)


def test_two_requests_batched_with_state_on_axis_1_answer_as_they_would_alone(
    serving_agent: Agent, mqtt_broker: RunningBroker, vad: Path
) -> None:
    first, second = voice_inputs(1, 512, seed=1), voice_inputs(2, 512, seed=2)
    m = serving_agent.host.get("vad")
    assert m is not None
    calls = m.served
    with EdgeClient(mqtt_broker.host, mqtt_broker.port) as client:
        futures = [client.submit("wild-1", "vad", first), client.submit("wild-1", "vad", second)]
        answers = [client.result(f.result(10)) for f in futures]
    wait_for(lambda: m.served > calls, 10, "the model called")
    assert m.served == calls + 1  # one runtime call for both requests
    for inputs, got in zip([first, second], answers):
        want = reference(vad, inputs)  # each alone, in plain onnxruntime
        assert got["stateN"].shape == (2, inputs["input"].shape[0], 128)
        np.testing.assert_allclose(got["output"], want["output"], atol=1e-5)
        np.testing.assert_allclose(got["stateN"], want["stateN"], atol=1e-5)

    # Different sample rates cannot share a call (sr goes in once): answered one by one, each correct.
    other = voice_inputs(1, 512, sr=8000, seed=4)
    calls = m.served
    with EdgeClient(mqtt_broker.host, mqtt_broker.port) as client:
        futures = [client.submit("wild-1", "vad", first), client.submit("wild-1", "vad", other)]
        answers = [client.result(f.result(10)) for f in futures]
    assert m.served == calls + 2
    for inputs, got in zip([first, other], answers):
        np.testing.assert_allclose(got["output"], reference(vad, inputs)["output"], atol=1e-5)
