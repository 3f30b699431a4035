"""The scale benchmark at a tiny size: it runs end to end and its JSON says what the README's table reads.

Not a timing test (no goal is asserted here; a loaded machine must not fail it): two ``fleet serve`` on a fresh
PostgreSQL database, simulated devices in their own process, a rollout, the leader killed with SIGKILL in the third
wave, and one ingest round each way — checked for its fields, the rollouts finished, and nothing lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(700)
def test_the_scale_benchmark_runs_small_and_loses_nothing(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.scale",
        "--devices",
        "40",
        "--messages",
        "400",
        "--rounds",
        "1",
        "--telemetry-s",
        "1",
        "--steady-s",
        "1",
        "--results",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "scale.json").read_text())
    assert "| figure | value |" in (tmp_path / "scale.md").read_text()

    fleet = result["fleet"]
    for run in (fleet["rollout"], fleet["killed"]):
        assert run["state"] == "done" and run["devices_moved"] == 40, run
        assert set(run["controllers"]) >= {"leader"}, run
        assert all(c["cpu_s"] > 0 and c["rss_mb_max"] > 0 for c in run["controllers"].values()), run
        assert set(run["others_cpu_s"]) == {"simulators", "broker", "postgresql"}, run
        assert run["others_cpu_s"]["simulators"] > 0 and run["others_cpu_s"]["postgresql"] > 0, run
    killed = fleet["killed"]
    assert killed["takeover_s"] >= 0 and killed["survivor_running"], killed
    lost = killed["lost"]
    assert lost["telemetry_acknowledged"] > 0 and lost["telemetry_lost"] == 0, lost
    assert lost["jobs_active"] == 40 and lost["jobs_lost"] == 0, lost
    assert fleet["idle_controller_rss_mb"] > 0 and set(fleet["steady_cpu_percent"]) == {"leader", "standby"}

    ingest = result["ingest"]
    assert [s["lost"] for s in ingest["samples"]["raw"]] == [0]
    for name, subject in ingest["subjects"].items():
        assert subject["lost"] == 0, (name, subject)
        assert len(subject["ratios"]) == 1 and subject["ratio_median"] > 0, (name, subject)


def test_a_simulator_stops_when_its_broker_stopped_answering(tmp_path: Path) -> None:
    """A shard's SIGTERM came while the broker was too busy to acknowledge the devices' disconnects: (with aiomqtt) a
    timeout replaced the cancellation and every device went back to reconnecting, so the shard never exited (the
    benchmark waited 120 s for it). Here the broker is frozen with SIGSTOP, so no "disconnected" is acknowledged."""
    import os
    import signal

    from fleet.dev.broker import start_broker
    from fleet.dev.simulate import Simulator, SimulatorThread

    broker = start_broker(tmp_path / "broker")
    try:
        sim = Simulator(broker.host, broker.port, 5, "frozen", telemetry_s=0.2, initial={"m": "1.0.0"})
        sim.mqtt_timeout_s = 1.0
        running = SimulatorThread(sim).start(30)
        os.kill(broker.pid, signal.SIGSTOP)
        running.stop()  # joins for at most 30 s
        assert not running.thread.is_alive(), "the simulator was still running 30 s after stop()"
        assert running.error is None
    finally:
        os.kill(broker.pid, signal.SIGCONT)
        broker.stop()
