"""`fleet demo`, the README's main job, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from update_rig import wait_for

from agent.client import EdgeClient
from fleet.dev.broker import RunningBroker
from fleet.dev.demo import grpc_available, oip_available

FLEET = [sys.executable, "-m", "fleet.cli"]


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_fleet_demo_trains_signs_rolls_out_predicts_and_refuses_a_broken_release(broker: str) -> None:
    t0 = time.monotonic()
    cmd = [*FLEET, "demo", "--broker", broker]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "160"})
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stderr
    assert took < 60, f"the demo took {took:.0f} s"
    for device, runtime in (("demo-pi", "litert/CPU"), ("demo-npu", "openvino/CPU"), ("demo-jetson", "litert/CPU")):
        row = next(line for line in out.splitlines() if line.startswith(f"│ {device}"))
        assert "linear 1.1.0" in row and runtime in row, out[-4000:]  # everyone on v2, each on its own runtime
        finals = re.findall(r"→ \[([^\]]*)\]", row)[0].split(", ")
        assert abs(float(finals[2]) - 7.0) < 0.1  # y(3) = 2*3 + 1
    assert "passed over tensorrt:GPU.0: tensorrt is not installed" in out  # the Jetson's fallback, with the reason
    assert "passed over openvino:NPU" in out
    assert "rollout 2: linear 1.1.0 done" in out and "rollout 3: linear 1.2.0 aborted: install gate" in out
    shadow = re.search(r"shadow on demo-\w+: (\d+) live inputs compared, [\d.]+% within 1%, mean abs diff ([\d.]+)", out)
    assert shadow and int(shadow[1]) >= 60 and float(shadow[2]) < 0.1, out[-3000:]  # v2 ran in shadow on live traffic first
    assert f"broker {broker} on" in out
    assert re.search(r"dashboard http://127\.0\.0\.1:\d+/  metrics http://127\.0\.0\.1:\d+/metrics", out), out[:3000]
    assert re.search(r"background traffic during the rollouts: [1-9]\d* answered, 0 errors", out), out[-2000:]


def test_fleet_demo_keep_running_leaves_a_fleet_to_talk_to(tmp_path: Path) -> None:
    """Output to a file and stdout a pipe (not a terminal: rich would wrap at 80 columns) with a workdir path longer than
    that: every path and command stays on one line, and the printed ones work as printed."""
    log = tmp_path / "demo.log"
    workdir = tmp_path / ("a-rather-long-directory-name-for-the-demo-" * 3) / "demo"
    proc = subprocess.Popen([*FLEET, "demo", "--keep-running", "--workdir", str(workdir)], stderr=open(log, "wb"), stdout=subprocess.PIPE)
    try:
        text = wait_for(lambda: log.read_text() if "Ctrl-C stops everything" in log.read_text() else None, 120, "the demo up")
        lines = text.splitlines()
        assert any(line.endswith(f"files in {workdir}") for line in lines), text[-3000:]
        assert any(line.endswith(str(workdir / "devices" / "demo-pi" / "agent.log")) for line in lines), text[:3000]
        host, port = re.search(r"broker (\S+):(\d+), files in", text).groups()  # type: ignore[union-attr]
        with EdgeClient(host, int(port)) as c:
            assert abs(float(c.infer("demo-npu", "linear", [[4.0]])["y"][0][0]) - 9.0) < 0.1
        pub = next(line for line in lines if "mosquitto_pub" in line)
        assert pub.endswith("}'") and "EdgeClient" in text  # one line each, whole
        dashboard = re.search(r"^dashboard (http://\S+/)  metrics", text, re.M)[1]  # type: ignore[index]
        with urllib.request.urlopen(dashboard, timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        with urllib.request.urlopen(dashboard + "metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'edgefleet_devices{hardware="' in metrics and "edgefleet_rollouts{" in metrics
        curl = [line.strip() for line in lines if line.strip().startswith("curl -s -X POST")]
        if oip_available():  # the agents' OIP endpoint (serving.http) is in this build
            assert len(curl) == 1 and all(f"OIP {d} http://127.0.0.1:" in text for d in ("demo-pi", "demo-npu", "demo-jetson"))
            done = subprocess.run(["bash", "-c", curl[0]], capture_output=True, text=True, timeout=30)
            answer = json.loads(done.stdout)
            assert abs(float(answer["outputs"][0]["data"][0]) - 9.0) < 0.1, done.stdout  # y(4) = 2*4 + 1 on demo-pi
        else:
            assert not curl and "OIP demo-" not in text
        calls = [line.strip() for line in lines if "tritonclient.grpc" in line]
        if grpc_available():  # and the gRPC endpoint (serving.grpc): called as printed, with the unmodified tritonclient
            assert len(calls) == 1 and all(f"OIP gRPC {d} 127.0.0.1:" in text for d in ("demo-pi", "demo-npu", "demo-jetson"))
            call = calls[0].replace(".venv/bin/python", sys.executable, 1)  # the venv the tests run in, wherever it is
            done = subprocess.run(["bash", "-c", call], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0 and abs(float(done.stdout.strip(" []\n")) - 9.0) < 0.1, (done.stdout, done.stderr[-2000:])
        else:
            assert not calls and "OIP gRPC" not in text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


def test_an_agent_that_dies_fails_the_demo_at_once_naming_it(mqtt_broker: RunningBroker, tmp_path: Path) -> None:
    """The demo waited 60 s for three agents to report, whatever had become of them (once, in a full test run, with
    nothing to say why); an agent process that ends now fails it at once with its exit status and log."""
    from agent.settings import BrokerSettings
    from fleet.dev.demo import DemoError, _Demo

    demo = _Demo(tmp_path, BrokerSettings(host=mqtt_broker.host, port=mqtt_broker.port), lambda *what: None)
    try:
        demo.start_controller()
        demo.start_agents()
        demo.check_agents()  # all three running
        victim = demo.agents[1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        with pytest.raises(DemoError, match=r"agent demo-npu exited with status -9"):
            demo.check_agents()
    finally:
        demo.close()


def test_printed_calls_quote_what_a_manifest_names(tmp_path: Path) -> None:
    """The curl and gRPC lines carry names from a bundle's manifest: whatever they hold (quotes, $(...)), the shell
    hands them over as written and runs nothing of them. A missing client package is "not installed", not a crash."""
    import shlex

    from fleet.dev.demo import _installed, grpc_call, oip_curl

    hostile = 'it\'s "$(touch PWNED)" `id`'
    manifest = tmp_path / "bundle.json"
    manifest.write_text(json.dumps({"inputs": [{"name": hostile, "shape": [-1, 1], "dtype": "float32"}], "outputs": [{"name": hostile}]}))
    body = json.loads(shlex.split(oip_curl("http://127.0.0.1:1", "linear", manifest))[-1])
    assert body["inputs"][0]["name"] == hostile and body["inputs"][0]["shape"] == [1, 1]
    argv = shlex.split(grpc_call("127.0.0.1:1", "linear", manifest))
    assert argv[:2] == [".venv/bin/python", "-c"] and len(argv) == 3
    compile(argv[2], "<printed>", "exec")  # the Python is whole, and names the input as the manifest does
    assert repr(hostile) in argv[2]
    for line in (grpc_call("127.0.0.1:1", "linear", manifest).replace(".venv/bin/python", "true", 1), oip_curl("x", "m", manifest)):
        done = subprocess.run(["bash", "-c", line.replace("curl", "true", 1)], cwd=tmp_path, timeout=10)  # as printed, harmless
        assert done.returncode == 0 and not (tmp_path / "PWNED").exists()
    assert not _installed("no_such_package_anywhere.grpc")
