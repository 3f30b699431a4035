"""``fleet demo``: the whole system on one machine, in under a minute.

A private broker, the controller (repository server, registry, rollout engine) and
three agents in their own processes with the hardware of a Raspberry Pi 5, an Intel
Core Ultra with an NPU and a Jetson Orin (``fleet.dev.hardware_trees``; the runtimes are
this machine's). The seed's linear regression (y = 2x + 1 on noisy data, numpy) is
trained, built, signed and rolled out; predictions come back over MQTT; a retrained v2
goes out in waves behind the health gate; a deliberately broken v3 is rejected by the
first device and the fleet stays on v2. While it runs, the dashboard and ``/metrics`` are served on loopback, and each
agent's Open Inference Protocol endpoints (``serving.http``, ``serving.grpc``) where this install has them; their
URLs are printed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
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

from agent.client import EdgeClient
from agent.errors import EdgefleetError
from agent.settings import BrokerSettings, ServingSettings, write_config
from fleet.controller import Controller
from fleet.dashboard import Dashboard
from fleet.dev import hardware_trees
from fleet.dev.broker import free_port, start_broker
from fleet.rollout import Gates, RolloutSpec
from fleet.store import Rollout
from fleet.tuf.director import Director
from fleet.tuf.image_repo import ImageRepository
from fleet.tuf.keys import init_keys

__all__ = ["DemoError", "run_demo"]

# Three agents, the controller, the broker and the traffic share one machine's CPUs: a p95 a few milliseconds above
# the one before is that machine being busy (measured: 0.9 -> 4.0 ms on a 2-core box under a parallel test run), not
# the one-multiply model getting slower. The production default (1 ms) stays for real devices.
DEMO_P95_FLOOR_MS = 10.0

MODEL = "linear"
DEVICES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "demo-pi": ("Raspberry Pi 5", hardware_trees.raspberry_pi_5),
    "demo-npu": ("Intel Core Ultra + NPU", hardware_trees.intel_core_ultra),
    "demo-jetson": ("Jetson AGX Orin", hardware_trees.jetson_orin),
}
OIP_DATATYPES = {
    "float32": "FP32",
    "float16": "FP16",
    "float64": "FP64",
    "int8": "INT8",
    "uint8": "UINT8",
    "int32": "INT32",
    "int64": "INT64",
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
    dashboard: str = ""  # the dashboard's URL (``/metrics`` beside it)
    oip: dict[str, str] = field(default_factory=dict)  # device -> its OIP endpoint's base URL (none: this agent has none)
    curl: str = ""  # an OIP infer call to the first device, built from the served model's real input
    grpc: dict[str, str] = field(default_factory=dict)  # device -> its OIP gRPC endpoint's address (none: no grpc extra)
    grpc_call: str = ""  # the same infer call over gRPC with tritonclient, where it is installed


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
    """``fleet demo``. ``broker_kind`` mosquitto falls back to the embedded amqtt when mosquitto is not installed."""
    console = console or Console(stderr=True)
    t_start = time.monotonic()
    work = Path(workdir or tempfile.mkdtemp(prefix="edgefleet-demo-"))
    work.mkdir(parents=True, exist_ok=True)

    def say(*what: Any) -> None:
        """Never wrapped: a path or a command split over two lines cannot be copied (rich wraps at 80 columns in a pipe)."""
        console.print(*what, soft_wrap=True)

    broker = start_broker(work / "broker", prefer=broker_kind)  # type: ignore[arg-type]
    mqtt_version: Literal["5", "3.1.1"] = "5" if broker.kind == "mosquitto" else "3.1.1"  # amqtt speaks MQTT 3.1.1 only
    # handed to the controller's clients and written into each agent's config (never through the environment)
    broker_settings = BrokerSettings(host=broker.host, port=broker.port, mqtt_version=mqtt_version)
    address = f"{broker.host}:{broker.port}"
    say(f"[bold]broker[/bold] {broker.kind} on {address} (MQTT {mqtt_version})")
    demo = _Demo(work, broker_settings, say)
    try:
        demo.start_controller()
        demo.start_agents()
        result = demo.play(DemoResult(address, work, dashboard=demo.dashboard_url, oip=dict(demo.oip)))
        result.seconds = time.monotonic() - t_start
        _summary(console, result)
        if keep_running:
            _keep_running(console, result, stop or threading.Event())
        return result
    finally:
        demo.close()
        broker.stop()
        if workdir is None and not keep_running:
            shutil.rmtree(work, ignore_errors=True)


class _Traffic:
    """Steady inference requests to every device in a thread, so the health gate has telemetry to compare; each error
    is counted and the last one kept (the swaps should cost none)."""

    def __init__(self, client: EdgeClient, xs: np.ndarray) -> None:
        self.client, self.xs = client, xs
        self.answered, self.errors, self.last_error = 0, 0, ""
        self.stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            for device in DEVICES:
                try:
                    self.client.infer(device, MODEL, {"x": self.xs}, timeout=5)
                    self.answered += 1
                except EdgefleetError as exc:
                    self.errors += 1
                    self.last_error = str(exc)
            time.sleep(0.02)  # a request rate, not a wait for a condition


class _Demo:
    """One run of the story: what it started (``close`` stops it, agents first) and its steps, in the order told."""

    def __init__(self, work: Path, broker: BrokerSettings, say: Callable[..., None]) -> None:
        self.work, self.broker, self.say = work, broker, say
        self.agents: list[subprocess.Popen[bytes]] = []
        self.controller: Controller | None = None
        self.dashboard: Dashboard | None = None
        self.dashboard_url = ""
        self.oip: dict[str, str] = {}
        self.grpc: dict[str, str] = {}
        self.client: EdgeClient | None = None
        self.traffic: _Traffic | None = None
        self.xs = np.array([[0.0], [1.0], [3.0]], np.float32)

    def start_controller(self) -> None:
        self.keys = init_keys(self.work / "keys")
        serve = self.work / "serve"
        self.image = ImageRepository.create(serve / "image", self.keys)
        self.director = Director.create(serve / "director", self.keys)
        self.controller = Controller(serve, self.keys, store=self.work / "fleet.db", tick_s=0.25, broker=self.broker).start()
        assert self.controller.store is not None and self.controller.engine is not None
        self.store, self.engine = self.controller.store, self.controller.engine
        self.say(f"[bold]controller[/bold] keys, image repository, director and store in {self.work}")
        self.dashboard = Dashboard(self.store, "127.0.0.1", free_port(), controller=self.controller).start()
        self.dashboard_url = self.dashboard.url
        self.say(f"[bold]dashboard[/bold] {self.dashboard.url}  [bold]metrics[/bold] {self.dashboard.url}metrics")

    def start_agents(self) -> None:
        """One agent process per device, on its hardware tree, trusting both repositories' first roots."""
        for device, (label, tree) in DEVICES.items():
            root = tree(self.work / "hardware" / device)
            state = self.work / "devices" / device
            state.mkdir(parents=True, exist_ok=True)
            config = write_config(
                state / "agent.toml",
                {
                    "device_id": device,
                    "state_dir": state,
                    "hardware_root": root,
                    "log_level": "WARNING",
                    "broker": {"host": self.broker.host, "port": self.broker.port, "mqtt_version": self.broker.mqtt_version},
                    "update": {
                        "image_root": self.image.metadata / "1.root.json",
                        "director_root": self.director.directory / "1.root.json",
                        "retry_s": 0.5,
                    },
                    "telemetry": {"interval_s": 1},
                    "serving": self.oip_serving(device),
                },
            )
            log = open(state / "agent.log", "wb")  # the agent process owns it
            self.agents.append(
                subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=log)
            )
            self.say(f"[bold]agent[/bold] {device} ({label}) starting, log {state / 'agent.log'}")
            if device in self.oip:
                self.say(f"  OIP endpoint {self.oip[device]}/v2/models/{MODEL}")
            if device in self.grpc:
                self.say(f"  OIP gRPC endpoint {self.grpc[device]}")

    def check_agents(self) -> None:
        """An agent process that ended fails the demo at once, with the end of its log (not a wait for its report)."""
        for device, proc in zip(DEVICES, self.agents):
            if proc.poll() is not None:
                log = self.work / "devices" / device / "agent.log"
                tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
                raise DemoError(f"agent {device} exited with status {proc.returncode}: {' | '.join(tail)[-1500:]}")

    def oip_serving(self, device: str) -> dict[str, str]:
        """The agent's ``[serving]``: its Open Inference Protocol endpoints (REST, gRPC) on free loopback ports, where
        this install has them (the ``http`` and ``grpc`` extras)."""
        serving = {}
        if oip_available():
            serving["http"] = f"127.0.0.1:{free_port()}"
            self.oip[device] = f"http://{serving['http']}"
        if grpc_available():
            serving["grpc"] = self.grpc[device] = f"127.0.0.1:{free_port()}"
        return serving

    def play(self, result: DemoResult) -> DemoResult:
        """v1 to everyone, predictions; under steady traffic, v2 in shadow then in waves, a broken v3 refused."""
        self.say("training v1: y = 2x + 1 on noisy data (numpy least squares); building LiteRT and OpenVINO variants")
        self.image.release(_bundle(self.work, "1.0.0", seed=0), self.keys)
        every = len(DEVICES)

        def reported() -> bool:
            self.check_agents()
            return sum(1 for d in self.store.devices() if d.online and d.preferred_variants) == every

        _wait(reported, 60, "the three agents to report")
        result.rollouts.append(self.rollout("1.0.0", ["100%"], 0))
        self.client = EdgeClient(broker=self.broker)
        self.predict(result, "v1", show=True)
        self.traffic = _Traffic(self.client, self.xs)
        self.traffic.start()
        self.say(
            "retraining: v2 on more data; the first device runs it in shadow beside v1 on the live traffic (shadow gate: mean"
            " difference under 0.1), then waves (1 device, then the rest) behind the health gate"
        )
        self.image.release(_bundle(self.work, "1.1.0", seed=1), self.keys)
        floor = DEMO_P95_FLOOR_MS
        shadow_gates = Gates(max_failed="0", min_agreement=None, max_shadow_diff=0.1, shadow_min_compared=60, p95_floor_ms=floor)
        result.rollouts.append(self.rollout("1.1.0", ["1", "all"], 2.0, shadow_gates, shadow=True))
        self.say("a deliberately broken v3 (its golden outputs are 3x off): the first device's health check must refuse it")
        self.image.release(_bundle(self.work, "1.2.0", seed=2, broken=True), self.keys)
        result.rollouts.append(self.rollout("1.2.0", ["1", "all"], 0))
        t = self.traffic
        t.stopped.set()
        self.say(f"background traffic during the rollouts: {t.answered} answered, {t.errors} errors {t.last_error}".rstrip())
        result.traffic_errors = t.errors
        self.predict(result, "final")
        result.devices = [d.to_json() for d in self.store.devices()]
        first = next(iter(DEVICES))
        manifest = self.work / f"{MODEL}-1.1.0" / "bundle.json"
        if first in self.oip:
            result.curl = oip_curl(self.oip[first], MODEL, manifest)
        result.grpc = dict(self.grpc)
        if first in self.grpc and _installed("tritonclient.grpc"):
            result.grpc_call = grpc_call(self.grpc[first], MODEL, manifest)
        return result

    def rollout(self, version: str, waves: list[str], soak: float, gates: Gates | None = None, shadow: bool = False) -> dict[str, Any]:
        """Roll ``version`` out, wait until it is done or aborted, and tell where each device ended up."""
        gates = gates or Gates(max_failed="0", p95_floor_ms=DEMO_P95_FLOOR_MS)
        spec = RolloutSpec(MODEL, version, "device=demo-*", waves, soak_s=soak, wave_timeout_s=60, gates=gates, shadow=shadow)
        rid = self.engine.start(spec)
        r = _wait(lambda: self.finished(rid), 90, f"the {version} rollout")
        devices = self.store.rollout_devices(rid)
        self.say(f"rollout {rid} of {MODEL} {version}: [bold]{r.state}[/bold] {r.reason}")
        for m in devices:
            self.say(f"  wave {m.wave + 1}: {m.device:<12} {m.variant:<14} {m.state} {m.reason}")
        if shadow:
            self.say_shadow(version, r.created, [m.device for m in devices if m.wave == 0])
        return {"id": rid, "version": version, "state": r.state, "reason": r.reason, "devices": [m.to_json() for m in devices]}

    def finished(self, rid: int) -> Rollout | None:
        r = self.store.rollout(rid)
        return r if r and r.state in ("done", "aborted") else None

    def say_shadow(self, version: str, since: float, canaries: list[str]) -> None:
        h = self.store.shadow_health(MODEL, version, since, canaries)
        diff = f"{h.mean_abs_diff:.4f}" if h.mean_abs_diff is not None else "-"
        agreement = f"{h.agreement:.1%}" if h.agreement is not None else "-"
        self.say(
            f"  shadow on {', '.join(canaries)}: {h.compared} live inputs compared, {agreement} within 1%,"
            f" mean abs diff {diff}, p95 {h.p95_ms} ms in shadow vs {h.active_p95_ms} ms serving"
        )

    def predict(self, result: DemoResult, when: str, show: bool = False) -> None:
        assert self.client is not None
        for device in DEVICES:
            out = self.client.infer(device, MODEL, {"x": self.xs}, timeout=20)
            result.predictions[f"{device} {when}"] = [round(float(v), 3) for v in out["y"].ravel()]
            if show:
                ys = result.predictions[f"{device} {when}"]
                self.say(f"  {device:<12} x={self.xs.ravel().tolist()} → y={ys} (model {out.version})")

    def close(self) -> None:
        """Traffic, client, agents (SIGTERM, then killed after 20 s), controller."""
        if self.traffic is not None:
            self.traffic.stopped.set()
        if self.client is not None:
            self.client.close()
        for proc in self.agents:
            proc.send_signal(signal.SIGTERM)
        for proc in self.agents:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.controller is not None:
            self.controller.stop()


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
            console.print(f"  {d['id']}: passed over {note}", soft_wrap=True)
    for ro in r.rollouts:
        console.print(
            f"rollout {ro['id']}: {MODEL} {ro['version']} {ro['state']}{': ' + ro['reason'] if ro['reason'] else ''}", soft_wrap=True
        )
    console.print(f"done in {r.seconds:.1f} s")


def oip_available() -> bool:
    """Whether this agent has the Open Inference Protocol endpoint (the ``serving.http`` setting) and its HTTP server."""
    return "http" in ServingSettings.model_fields and importlib.util.find_spec("uvicorn") is not None


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (``find_spec`` of ``a.b`` imports ``a``, and raises
    where ``a`` is missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def grpc_available() -> bool:
    """Whether this agent has the OIP gRPC endpoint (the ``serving.grpc`` setting) and grpcio with protobuf."""
    return "grpc" in ServingSettings.model_fields and _installed("grpc") and _installed("google.protobuf")


def grpc_call(address: str, model: str, manifest: Path) -> str:
    """A Python one-liner making one OIP infer call over gRPC with tritonclient (an unmodified client of the protocol),
    its input named, typed and shaped as the bundle's manifest says (a dynamic dim: 1)."""
    bundle = json.loads(manifest.read_text())
    spec, output = bundle["inputs"][0], bundle["outputs"][0]["name"]
    shape = [1 if d < 0 else int(d) for d in spec["shape"]]
    code = (
        f"import numpy as np, tritonclient.grpc as g; i = g.InferInput({spec['name']!r}, {shape}, {OIP_DATATYPES[spec['dtype']]!r});"
        f" i.set_data_from_numpy(np.full({shape}, 4.0, np.dtype({spec['dtype']!r})));"
        f" print(g.InferenceServerClient({address!r}).infer({model!r}, [i]).as_numpy({output!r}))"
    )
    return f".venv/bin/python -c {shlex.quote(code)}"  # names come from a manifest: quoted for the shell, whatever they hold


def oip_curl(base_url: str, model: str, manifest: Path) -> str:
    """A ``curl`` for one OIP infer call, its input named and shaped as the bundle's manifest says (a dynamic dim: 1)."""
    spec = json.loads(manifest.read_text())["inputs"][0]
    shape = [1 if d < 0 else int(d) for d in spec["shape"]]
    body = {"inputs": [{"name": spec["name"], "shape": shape, "datatype": OIP_DATATYPES[spec["dtype"]], "data": [4.0] * math.prod(shape)}]}
    return f"curl -s -X POST {base_url}/v2/models/{model}/infer -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"


def _keep_running(console: Console, r: DemoResult, stop: threading.Event) -> None:
    host, port = r.broker.split(":")
    commands = [
        f"mosquitto_sub -h {host} -p {port} -t 'edgefleet/v1/dev/+/pred/#' -v &",
        f'mosquitto_pub -h {host} -p {port} -t edgefleet/v1/dev/demo-pi/infer/{MODEL} -m \'{{"request_id": "r1", "inputs": [[4.0]]}}\'',
        f"mosquitto_sub -h {host} -p {port} -t 'edgefleet/v1/dev/+/telemetry' -C 3",
        f'.venv/bin/python -c "from agent.client import EdgeClient;'
        f" print(EdgeClient('{host}', {port}).infer('demo-npu', '{MODEL}', [[4.0]]))\"",
        f"curl -s {r.dashboard}metrics | grep '^edgefleet_'",
        *([r.curl] if r.curl else []),
        *([r.grpc_call] if r.grpc_call else []),
    ]
    console.print(f"\n[bold]still running[/bold] — broker {r.broker}, files in {r.workdir}", soft_wrap=True)
    console.print(f"dashboard {r.dashboard}  metrics {r.dashboard}metrics", soft_wrap=True)
    for device, url in r.oip.items():
        console.print(f"OIP {device} {url}/v2/models/{MODEL}", soft_wrap=True)
    for device, address in r.grpc.items():
        console.print(f"OIP gRPC {device} {address}", soft_wrap=True)
    console.print("Try:")
    for line in commands:  # no markup (a JSON body has brackets), never wrapped: each is one line to copy
        console.print("  " + line, soft_wrap=True, markup=False, highlight=False)
    console.print("Ctrl-C stops everything.")
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.2):
        pass
