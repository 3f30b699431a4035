"""`fleet demo`, the README's main job, as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from update_rig import wait_for

from agent.client import EdgeClient

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
    assert re.search(r"background traffic during the rollouts: [1-9]\d* answered, 0 errors", out), out[-2000:]


def test_fleet_demo_keep_running_leaves_a_fleet_to_talk_to(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    proc = subprocess.Popen(
        [*FLEET, "demo", "--keep-running", "--workdir", str(tmp_path / "demo")], stderr=open(log, "wb"), stdout=subprocess.DEVNULL
    )
    try:
        text = wait_for(lambda: log.read_text() if "still running" in log.read_text() else None, 120, "the demo up")
        host, port = re.search(r"broker (\S+):(\d+), files in", text).groups()  # type: ignore[union-attr]
        with EdgeClient(host, int(port)) as c:
            assert abs(float(c.infer("demo-npu", "linear", [[4.0]])["y"][0][0]) - 9.0) < 0.1
        assert "mosquitto_pub" in text and "EdgeClient" in text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
