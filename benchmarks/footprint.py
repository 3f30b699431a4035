"""The agent at rest on a device: memory, CPU and start-up time, with a LiteRT model loaded.

Configured as a Pi would be: ``runtime.enabled = ["litert"]`` (this machine also has OpenVINO
and ONNX Runtime installed; importing them to report them would add ~50 MB).

An agent installs a small TFLite model through the real update path, stops, and is
started again under a ``$NOTIFY_SOCKET`` of ours: start to READY=1 (model restored and
serving), in pairs with a bare ``python3`` started to its first output (the interpreter
alone; the order alternates); then RSS and CPU over 10 idle seconds beside the bare
interpreter's. Goals (issue 7): idle RSS <= 100 MB, idle CPU < 1%, a median start to
READY < 2 s.

Run: ``python -m benchmarks.footprint [--quick] [--repeat N]``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from agent.settings import write_config
from benchmarks.common import Paired, Plan, alternating, arguments, pairs, report, yes_no


def _fleet(work: Path, host: str, port: int) -> Path:
    from converters import builders
    from converters.build import build
    from fleet.controller import Controller
    from fleet.transport.announce import announce
    from fleet.tuf.director import Director
    from fleet.tuf.image_repo import ImageRepository
    from fleet.tuf.keys import init_keys

    keys = init_keys(work / "keys")
    image = ImageRepository.create(work / "serve" / "image", keys)
    director = Director.create(work / "serve" / "director", keys)
    src = builders.write_tflite_mlp(builders.random_mlp([64, 128, 10], seed=1), work / "m.tflite")
    build(src, "m", "1.0.0", work / "bundle", variants=["tflite-fp32"])
    image.release(work / "bundle", keys)
    Controller(work / "serve", keys, host, port).start()
    director.assign("foot", image, "m", "1.0.0", "tflite-fp32", keys)
    announce(director, ["foot"], host, port)
    config = write_config(
        work / "agent.toml",
        {
            "device_id": "foot",
            "state_dir": work / "state",
            "log_level": "WARNING",
            "broker": {"host": host, "port": port},
            "update": {"image_root": image.metadata / "1.root.json", "director_root": director.directory / "1.root.json"},
            "runtime": {"enabled": ["litert"]},
        },
    )
    return config


def _idle(proc: psutil.Process, seconds: float) -> tuple[float, float]:
    """(RSS MB, CPU %) of ``proc`` over ``seconds`` of doing nothing."""
    proc.cpu_percent(None)
    time.sleep(seconds)
    return proc.memory_info().rss / 2**20, proc.cpu_percent(None)


QUICK = Plan(min_pairs=3, max_pairs=5, budget_s=15.0)
FULL = Plan(min_pairs=7, max_pairs=15, budget_s=60.0)


def _ready(agent_cmd: list[str], work: Path) -> tuple[subprocess.Popen[bytes], float]:
    """The agent started under a notify socket of ours, and its seconds from start to READY=1."""
    sock_path = work / "notify.sock"
    sock_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    with sock:
        t0 = time.perf_counter()
        agent = subprocess.Popen(agent_cmd, stderr=subprocess.DEVNULL, env={**os.environ, "NOTIFY_SOCKET": str(sock_path)})
        while "READY=1" not in sock.recv(4096).decode():
            pass
        return agent, time.perf_counter() - t0


def _bare() -> tuple[subprocess.Popen[bytes], float]:
    """A bare interpreter that prints and sleeps, and its seconds to that first output."""
    t0 = time.perf_counter()
    bare = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(30)"], stdout=subprocess.PIPE)
    assert bare.stdout is not None
    bare.stdout.readline()
    return bare, time.perf_counter() - t0


def _install(agent_cmd: list[str], work: Path) -> None:
    """The first start installs the model through the real update path; then the agent stops."""
    first = subprocess.Popen(agent_cmd, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (work / "state" / "models").exists() or not any((work / "state" / "models").iterdir()):
        if time.monotonic() > deadline:
            raise RuntimeError("the model was never installed")
        time.sleep(0.2)
    time.sleep(1.0)
    first.terminate()
    first.wait(30)


def _starts(agent_cmd: list[str], work: Path, plan: Plan) -> Paired:
    def agent() -> float:
        proc, seconds = _ready(agent_cmd, work)
        proc.terminate()
        proc.wait(30)
        return seconds

    def bare() -> float:
        proc, seconds = _bare()
        proc.kill()
        proc.wait()
        return seconds

    return pairs(alternating(bare, agent), plan)


def main(argv: list[str] | None = None) -> None:
    from fleet.dev.broker import start_broker

    ap, plan_of = arguments(__doc__.splitlines()[0], QUICK, FULL)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with start_broker(work / "broker") as broker:
            config = _fleet(work, broker.host, broker.port)
            agent_cmd = [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]
            _install(agent_cmd, work)
            starts = _starts(agent_cmd, work, plan_of(args))
            agent, _ = _ready(agent_cmd, work)
            time.sleep(2.0)  # let start-up work (first telemetry, reports) pass
            rss, cpu = _idle(psutil.Process(agent.pid), 10.0)
            agent.terminate()
            agent.wait(30)
            bare, _ = _bare()
            bare_rss, bare_cpu = _idle(psutil.Process(bare.pid), 3.0)
            bare.kill()
    _report(starts, rss, cpu, bare_rss, bare_cpu)


def _report(starts: Paired, rss: float, cpu: float, bare_rss: float, bare_cpu: float) -> None:
    ready_s = starts.subject_median
    goals = {"rss": rss <= 100, "cpu": cpu < 1.0, "ready": ready_s < 2.0}
    ratio, spread = starts.cells(1)
    headers = ["footprint (LiteRT model loaded)", "agent", "bare python3", "ratio", "spread [min, max]", "goal", "met"]
    cells = [
        ["idle RSS MB", f"{rss:.1f}", f"{bare_rss:.1f}", f"{rss / bare_rss:.1f}", "-", "<= 100 MB", yes_no(goals["rss"])],
        ["idle CPU % (10 s)", f"{cpu:.2f}", f"{bare_cpu:.2f}", "-", "-", "< 1%", yes_no(goals["cpu"])],
        [
            f"start to READY s ({len(starts.ratios)} starts)",
            f"{ready_s:.2f}",
            f"{starts.baseline_median:.3f} (to first output)",
            ratio,
            spread,
            "< 2 s",
            yes_no(goals["ready"]),
        ],
    ]
    payload = {
        "ready_s": round(ready_s, 2),
        "idle_rss_mb": round(rss, 1),
        "idle_cpu_percent": round(cpu, 2),
        "bare_python_start_s": round(starts.baseline_median, 3),
        "bare_python_rss_mb": round(bare_rss, 1),
        "starts": starts.to_json(),
        "goals": goals,
    }
    report("footprint", headers, cells, payload)


if __name__ == "__main__":
    main()
