"""``fleet demo``: the whole system on one machine, in under a minute.

A private broker, the controller (repository server, registry, rollout engine) and
three agents in their own processes with the hardware of a Raspberry Pi 5, an Intel
Core Ultra with an NPU and a Jetson Orin (``fleet.dev.hardware_trees``; the runtimes are
this machine's). The seed's linear regression (y = 2x + 1 on noisy data, numpy) is
trained, built, signed and rolled out; predictions come back over MQTT; a retrained v2
goes out in waves behind the health gate; a deliberately broken v3 is rejected by the
first device and the fleet stays on v2.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.table import Table

from agent.errors import EdgefleetError
from agent.settings import write_config
from fleet.dev import hardware_trees

__all__ = ["DemoError", "run_demo"]

MODEL = "linear"
DEVICES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "demo-pi": ("Raspberry Pi 5", hardware_trees.raspberry_pi_5),
    "demo-npu": ("Intel Core Ultra + NPU", hardware_trees.intel_core_ultra),
    "demo-jetson": ("Jetson AGX Orin", hardware_trees.jetson_orin),
}


class DemoError(EdgefleetError):
    code = "demo_failed"


@dataclass
class DemoResult:
    broker: str
    workdir: Path
    devices: list[dict[str, Any]] = field(default_factory=list)
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, list[float]] = field(default_factory=dict)
    traffic_errors: int = 0
    seconds: float = 0.0


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


def _bundle(work: Path, version: str, seed: int, broken: bool = False) -> Path:
    """Train (numpy least squares), write TFLite, build the bundle: LiteRT and OpenVINO variants, parity-checked."""
    from converters.build import build
    from converters.builders import write_tflite_mlp
    from converters.demo_models import linear_regression

    model = linear_regression(seed=seed, n=200 + 100 * seed)
    source = write_tflite_mlp(model, work / f"linear-{version}.tflite")
    out = work / f"{MODEL}-{version}"
    build(source, MODEL, version, out, variants=["tflite-fp32", "openvino-fp32"])
    if broken:  # what a bad export looks like on the device: answers that are off
        for golden in out.glob("golden_*.npz"):
            with np.load(golden) as z:
                data = {k: (z[k] * 3.0 if k.startswith("out:") else z[k]) for k in z.files}
            np.savez(golden, **data)  # type: ignore[arg-type]
    return out


def run_demo(
    workdir: Path | None = None,
    keep_running: bool = False,
    console: Console | None = None,
    stop: threading.Event | None = None,
    broker_kind: str = "mosquitto",
) -> DemoResult:
    """``broker_kind`` mosquitto falls back to the embedded amqtt when mosquitto is not installed."""
    from agent.client import EdgeClient
    from agent.settings import BrokerSettings
    from fleet.controller import Controller
    from fleet.dev.broker import start_broker
    from fleet.rollout import Gates, RolloutSpec
    from fleet.tuf.director import Director
    from fleet.tuf.image_repo import ImageRepository
    from fleet.tuf.keys import init_keys

    console = console or Console(stderr=True)
    t_start = time.monotonic()
    work = Path(workdir or tempfile.mkdtemp(prefix="edgefleet-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    say = console.print
    broker = start_broker(work / "broker", prefer=broker_kind)  # type: ignore[arg-type]
    mqtt_version: Literal["5", "3.1.1"] = "5" if broker.kind == "mosquitto" else "3.1.1"  # amqtt speaks MQTT 3.1.1 only
    # handed to the controller's clients and written into each agent's config (never through the environment)
    broker_settings = BrokerSettings(host=broker.host, port=broker.port, mqtt_version=mqtt_version)
    address = f"{broker.host}:{broker.port}"
    say(f"[bold]broker[/bold] {broker.kind} on {address} (MQTT {mqtt_version})")
    agents: list[subprocess.Popen[bytes]] = []
    controller = None
    client = None
    load_stop = threading.Event()
    try:
        keys = init_keys(work / "keys")
        serve = work / "serve"
        image = ImageRepository.create(serve / "image", keys)
        director = Director.create(serve / "director", keys)
        controller = Controller(serve, keys, store=work / "fleet.db", tick_s=0.25, broker=broker_settings).start()
        assert controller.store is not None and controller.engine is not None
        store, engine = controller.store, controller.engine
        say(f"[bold]controller[/bold] keys, image repository, director and store in {work}")

        for device, (label, tree) in DEVICES.items():
            root = tree(work / "hardware" / device)
            state = work / "devices" / device
            state.mkdir(parents=True, exist_ok=True)
            config = write_config(
                state / "agent.toml",
                {
                    "device_id": device,
                    "state_dir": state,
                    "hardware_root": root,
                    "log_level": "WARNING",
                    "broker": {"host": broker.host, "port": broker.port, "mqtt_version": mqtt_version},
                    "update": {
                        "image_root": image.metadata / "1.root.json",
                        "director_root": director.directory / "1.root.json",
                        "retry_s": 0.5,
                    },
                    "telemetry": {"interval_s": 1},
                },
            )
            log = open(state / "agent.log", "wb")  # the agent process owns it
            agents.append(
                subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=log)
            )
            say(f"[bold]agent[/bold] {device} ({label}) starting, log {state / 'agent.log'}")

        say("training v1: y = 2x + 1 on noisy data (numpy least squares); building LiteRT and OpenVINO variants")
        image.release(_bundle(work, "1.0.0", seed=0), keys)
        _wait(
            lambda: sum(1 for d in store.devices() if d.online and d.preferred_variants) == len(DEVICES), 60, "the three agents to report"
        )

        def rollout(version: str, waves: list[str], soak: float, gates: Gates | None = None, shadow: bool = False) -> dict[str, Any]:
            gates = gates or Gates(max_failed="0")
            rid = engine.start(
                RolloutSpec(MODEL, version, "device=demo-*", waves, soak_s=soak, wave_timeout_s=60, gates=gates, shadow=shadow)
            )
            r = _wait(
                lambda: (lambda x: x if x and x.state in ("done", "aborted") else None)(store.rollout(rid)), 90, f"the {version} rollout"
            )
            devices = store.rollout_devices(rid)
            say(f"rollout {rid} of {MODEL} {version}: [bold]{r.state}[/bold] {r.reason}")
            for m in devices:
                say(f"  wave {m.wave + 1}: {m.device:<12} {m.variant:<14} {m.state} {m.reason}")
            if shadow:
                canaries = [m.device for m in devices if m.wave == 0]
                h = store.shadow_health(MODEL, version, r.created, canaries)
                diff = f"{h.mean_abs_diff:.4f}" if h.mean_abs_diff is not None else "-"
                agreement = f"{h.agreement:.1%}" if h.agreement is not None else "-"
                say(
                    f"  shadow on {', '.join(canaries)}: {h.compared} live inputs compared, {agreement} within 1%,"
                    f" mean abs diff {diff}, p95 {h.p95_ms} ms in shadow vs {h.active_p95_ms} ms serving"
                )
            return {"id": rid, "version": version, "state": r.state, "reason": r.reason, "devices": [m.to_json() for m in devices]}

        result = DemoResult(address, work)
        result.rollouts.append(rollout("1.0.0", ["100%"], 0))
        client = EdgeClient(broker=broker_settings)
        xs = np.array([[0.0], [1.0], [3.0]], np.float32)
        for device in DEVICES:
            out = client.infer(device, MODEL, {"x": xs}, timeout=20)
            result.predictions[f"{device} v1"] = [round(float(v), 3) for v in out["y"].ravel()]
            say(f"  {device:<12} x={xs.ravel().tolist()} → y={result.predictions[f'{device} v1']} (model {out.version})")

        traffic = {"answered": 0, "errors": 0}
        last_error: list[str] = []

        def load() -> None:  # steady traffic, so the health gate has telemetry to compare
            while not load_stop.is_set():
                for device in DEVICES:
                    try:
                        client.infer(device, MODEL, {"x": xs}, timeout=5)  # type: ignore[union-attr]
                        traffic["answered"] += 1
                    except EdgefleetError as exc:  # counted and shown: the swaps should cost none
                        traffic["errors"] += 1
                        last_error[:] = [str(exc)]
                time.sleep(0.02)

        threading.Thread(target=load, daemon=True).start()
        say(
            "retraining: v2 on more data; the first device runs it in shadow beside v1 on the live traffic (shadow gate: mean"
            " difference under 0.1), then waves (1 device, then the rest) behind the health gate"
        )
        image.release(_bundle(work, "1.1.0", seed=1), keys)
        shadow_gates = Gates(max_failed="0", min_agreement=None, max_shadow_diff=0.1, shadow_min_compared=60)
        result.rollouts.append(rollout("1.1.0", ["1", "all"], 2.0, shadow_gates, shadow=True))
        say("a deliberately broken v3 (its golden outputs are 3x off): the first device's health check must refuse it")
        image.release(_bundle(work, "1.2.0", seed=2, broken=True), keys)
        result.rollouts.append(rollout("1.2.0", ["1", "all"], 0))
        load_stop.set()
        answered, errors = traffic["answered"], traffic["errors"]
        say(f"background traffic during the rollouts: {answered} answered, {errors} errors {' '.join(last_error)}".rstrip())
        result.traffic_errors = traffic["errors"]
        for device in DEVICES:
            out = client.infer(device, MODEL, {"x": xs}, timeout=20)
            result.predictions[f"{device} final"] = [round(float(v), 3) for v in out["y"].ravel()]
        result.devices = [d.to_json() for d in store.devices()]
        result.seconds = time.monotonic() - t_start
        _summary(console, result)
        if keep_running:
            _keep_running(console, result, stop or threading.Event())
        return result
    finally:
        load_stop.set()
        if client is not None:
            client.close()
        for proc in agents:
            proc.send_signal(signal.SIGTERM)
        for proc in agents:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if controller is not None:
            controller.stop()
        broker.stop()
        if workdir is None and not keep_running:
            shutil.rmtree(work, ignore_errors=True)


def _summary(console: Console, r: DemoResult) -> None:
    table = Table("device", "hardware", "runs", "on", "y(0), y(1), y(3) with v1 → now", title="fleet demo", show_lines=False)
    for d in r.devices:
        m = d["models"].get(MODEL, {})
        table.add_row(
            d["id"],
            DEVICES.get(d["id"], ("?",))[0],
            f"{MODEL} {m.get('version', '-')}",
            f"{m.get('runtime', '-')}/{m.get('device', '-')} ({m.get('variant', '-')})",
            f"{r.predictions.get(d['id'] + ' v1')} → {r.predictions.get(d['id'] + ' final')}",
        )
    console.print(table)
    for d in r.devices:
        for note in d["models"].get(MODEL, {}).get("passed_over", []):
            console.print(f"  {d['id']}: passed over {note}")
    for ro in r.rollouts:
        console.print(f"rollout {ro['id']}: {MODEL} {ro['version']} {ro['state']}{': ' + ro['reason'] if ro['reason'] else ''}")
    console.print(f"done in {r.seconds:.1f} s")


def _keep_running(console: Console, r: DemoResult, stop: threading.Event) -> None:
    host, port = r.broker.split(":")
    console.print(
        f"""
[bold]still running[/bold] — broker {r.broker}, files in {r.workdir}. Try:
  mosquitto_sub -h {host} -p {port} -t 'edgefleet/v1/dev/+/pred/#' -v &
  mosquitto_pub -h {host} -p {port} -t edgefleet/v1/dev/demo-pi/infer/{MODEL} -m '{{"request_id": "r1", "inputs": [[4.0]]}}'
  mosquitto_sub -h {host} -p {port} -t 'edgefleet/v1/dev/+/telemetry' -C 3
  .venv/bin/python -c "from agent.client import EdgeClient; print(EdgeClient('{host}', {port}).infer('demo-npu', '{MODEL}', [[4.0]]))"
Ctrl-C stops everything."""
    )
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.2):
        pass
