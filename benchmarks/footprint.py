"""The agent at rest on a device: memory, CPU and start-up time, with a LiteRT model loaded.

Configured as a Pi would be: ``runtime.enabled = ["litert"]`` (this machine also has OpenVINO
and ONNX Runtime installed; importing them to report them would add ~50 MB).

An agent installs a small TFLite model through the real update path, stops, and is
started again under a ``$NOTIFY_SOCKET`` of ours: start to READY=1 (model restored and
serving), then RSS and CPU over 10 idle seconds. Baseline in the same run: a bare
``python3`` that sleeps (the interpreter alone). Goals (issue 7): idle RSS <= 100 MB,
idle CPU < 1%, start to READY < 2 s.

Run: ``python -m benchmarks.footprint``.
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
from benchmarks.common import machine, write


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


def main() -> None:
    from fleet.dev.broker import start_broker

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with start_broker(work / "broker") as broker:
            config = _fleet(work, broker.host, broker.port)
            agent_cmd = [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]
            first = subprocess.Popen(agent_cmd, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while not (work / "state" / "models").exists() or not any((work / "state" / "models").iterdir()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the model was never installed")
                time.sleep(0.2)
            time.sleep(1.0)
            first.terminate()
            first.wait(30)
            sock_path = work / "notify.sock"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(sock_path))
            sock.settimeout(60)
            t0 = time.perf_counter()
            agent = subprocess.Popen(agent_cmd, stderr=subprocess.DEVNULL, env={**os.environ, "NOTIFY_SOCKET": str(sock_path)})
            while "READY=1" not in sock.recv(4096).decode():
                pass
            ready_s = time.perf_counter() - t0
            time.sleep(2.0)  # let start-up work (first telemetry, reports) pass
            rss, cpu = _idle(psutil.Process(agent.pid), 10.0)
            agent.terminate()
            agent.wait(30)
            t0 = time.perf_counter()
            bare = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(30)"], stdout=subprocess.PIPE)
            assert bare.stdout is not None
            bare.stdout.readline()
            bare_start = time.perf_counter() - t0
            bare_rss, bare_cpu = _idle(psutil.Process(bare.pid), 3.0)
            bare.kill()
    row = {
        "ready_s": round(ready_s, 2),
        "idle_rss_mb": round(rss, 1),
        "idle_cpu_percent": round(cpu, 2),
        "bare_python_start_s": round(bare_start, 3),
        "bare_python_rss_mb": round(bare_rss, 1),
        "goals": {"rss": rss <= 100, "cpu": cpu < 1.0, "ready": ready_s < 2.0},
    }
    yes = {True: "yes", False: "NO"}
    md = (
        "| footprint (LiteRT model loaded) | agent | bare python3 | ratio | goal | met |\n|---|---|---|---|---|---|\n"
        f"| idle RSS MB | {row['idle_rss_mb']} | {row['bare_python_rss_mb']} | {rss / bare_rss:.1f} | <= 100 MB | {yes[rss <= 100]} |\n"
        f"| idle CPU % (10 s) | {row['idle_cpu_percent']} | {round(bare_cpu, 2)} | - | < 1% | {yes[cpu < 1.0]} |\n"
        f"| start to READY s | {row['ready_s']} | {row['bare_python_start_s']} (to first output) | {ready_s / bare_start:.1f} | < 2 s "
        f"| {yes[ready_s < 2.0]} |\n"
    )
    print(md)
    out = write("footprint", {"machine": machine(), **row}, md)
    print(f"wrote {out[0]} and {out[1]}")


if __name__ == "__main__":
    main()
