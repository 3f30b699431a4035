"""Inference through the broker: the agent against a raw MQTT echo, same broker, same payloads, same client.

Baseline: an echo process that subscribes to ``dev/echo/infer/+``, reads each request's
``reply_to`` and publishes the request back unchanged — MQTT and payload peeking, no
inference. Subject: ``edge-agent run`` in its own process serving the model. The client
is the same code for both: throughput with a window of requests in flight, latency with
one at a time. Both are measured in short alternating rounds (echo then agent, agent then
echo, ...) on the paired harness of ``benchmarks/common.py``: a ratio per pair, the median
and its spread. Goals (issue 18): agent requests/s >= 0.9x the echo's and p50 within
0.3 ms of it, tiny and medium models, JSON and binary (EFB1) payloads.

The price of a shadow (issue 18): a second agent process on the same broker runs the same
version with a second one in shadow; its requests/s against the agent without one, in
alternating rounds (goal: >= 0.9x).

The harness's own error: the echo against a second, identical echo process in the same alternating rounds (tiny
model's payload, JSON). Nothing differs, so how far its ratio lands from 1 is how far any row's can move by the
measurement alone (no goal).

The local-broker rows (issue 17): one agent serving on the fleet's broker and one taking inference on a second,
device-local mosquitto (``[serving.broker]``: a second connection, presence and telemetry stay on the fleet's), both
on loopback, in alternating rounds; each pair's ratio local/fleet, the median and the spread over the pairs.

Run: ``python -m benchmarks.serving [--quick] [--repeat N] [--part all|mqtt|oip|local]``.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from rich.console import Console
from rich.table import Table

from agent.mqtt import tcp_nodelay
from agent.settings import write_config
from agent.wire import device_topic
from agent.wire.inference import BINARY_MAGIC, encode_request
from benchmarks import serving_oip
from benchmarks.common import Paired, Plan, arguments, machine, paired_rounds, spread_cell, write, yes_no

MODELS = {"tiny": [4, 4], "medium": [64, 128, 128, 10]}

ECHO = r"""
import json, struct, sys, paho.mqtt.client as mqtt
from agent.mqtt import ReadAheadClient, tcp_nodelay
host, port, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
client_class = ReadAheadClient if device == "echo-own" else mqtt.Client
c = client_class(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
c.on_socket_open = tcp_nodelay
def head(p):
    if p[:4] == b"EFB1":
        return json.loads(p[8 : 8 + struct.unpack(">I", p[4:8])[0]])
    return json.loads(p)
def on_message(client, userdata, msg):
    client.publish(head(msg.payload)["reply_to"], msg.payload, qos=msg.qos)
c.on_message = on_message
c.on_connect = lambda cl, *a: (cl.subscribe(f"edgefleet/v1/dev/{device}/infer/+", qos=1), print("ready", flush=True))
c.connect(host, port)
c.loop_forever()
"""


def _request_id(payload: bytes | bytearray) -> str:
    """The request id of a reply (or of a request the echo sent back), JSON or binary (EFB1 header)."""
    if payload[:4] == BINARY_MAGIC:
        (n,) = struct.unpack(">I", payload[4:8])
        return str(json.loads(payload[8 : 8 + n])["request_id"])
    return str(json.loads(payload)["request_id"])


class Client:
    """One paho client, replies matched by request_id; the same for echo and agent."""

    def __init__(self, host: str, port: int) -> None:
        self.id = f"bench-{uuid.uuid4().hex[:6]}"
        self.done: dict[str, float] = {}
        self.sent: dict[str, float] = {}  # this run's requests: a late answer to an earlier run's is not counted
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=mqtt.MQTTv5)
        self.c.on_socket_open = tcp_nodelay
        self.c.on_message = self._on
        ready = threading.Event()
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.connect(host, port)
        self.c.subscribe(f"edgefleet/v1/dev/+/pred/+/{self.id}", qos=1)
        self.c.loop_start()
        ready.wait(10)

    def _on(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        rid = _request_id(msg.payload)
        with self.cond:
            if rid in self.sent:
                self.done[rid] = time.perf_counter()
                self.cond.notify_all()

    def payload(self, device: str, x: list[list[float]], binary: bool = False) -> tuple[str, bytes]:
        rid = uuid.uuid4().hex[:16]
        reply_to = device_topic(device, "pred", "m", self.id)
        if binary:
            return rid, encode_request(rid, {"x": np.asarray(x, dtype=np.float32)}, binary=True, reply_to=reply_to)
        body = {"request_id": rid, "inputs": {"x": x}, "reply_to": reply_to}
        return rid, json.dumps(body).encode()

    def run(
        self, device: str, x: list[list[float]], n: int, window: int, binary: bool = False, timeout: float = 60.0
    ) -> tuple[float, list[float]]:
        """(requests per second, per-request round trips in ms) for ``n`` requests, ``window`` in flight; RuntimeError
        when the last answers are not in ``timeout`` seconds after the last request."""
        topic = device_topic(device, "infer", "m")
        sent: dict[str, float] = {}
        with self.cond:
            self.done.clear()
            self.sent = sent
        t0 = time.perf_counter()
        for _ in range(n):
            rid, body = self.payload(device, x, binary)
            with self.cond:
                self.cond.wait_for(lambda: len(sent) - len(self.done) < window, 30)
                sent[rid] = time.perf_counter()
            self.c.publish(topic, body, qos=1)
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.done) >= len(sent), timeout):
                raise RuntimeError(f"{device}: {len(sent) - len(self.done)} requests unanswered")
        elapsed = time.perf_counter() - t0
        rtts = [(self.done[r] - t) * 1e3 for r, t in sent.items()]
        self.done.clear()
        return n / elapsed, rtts

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# label -> (serving settings, telemetry settings); the full run races each against the echo, --quick only the default
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "no prediction sums": ({}, {"prediction_every": 0}),
    "sums on every call": ({}, {"prediction_every": 1}),
    "always queued": ({"inline_below_ms": 0}, {}),
}
PAYLOADS = {"JSON": False, "binary": True}
# The echo devices and how the tables name them: stock paho (the goal's baseline), and the agent's own client
# (``agent.mqtt.ReadAheadClient``), which costs less per message: against it the ratio is the agent's own work alone.
ECHOES = {"echo": "echo", "echo-own": "echo on the agent's client", "echo-again": "a second, identical echo"}
THROUGHPUT_GOAL, P50_GOAL_MS, SHADOW_GOAL = 0.9, 0.3, 0.9
QUICK_PLAN, FULL_PLAN = Plan(6, 12, 6.0), Plan(8, 30, 8.0)


def _fleet(
    work: Path,
    host: str,
    port: int,
    model: str,
    serving: dict[str, Any],
    telemetry: dict[str, Any],
    shadow: bool,
    shadow_device: str | None = None,
) -> tuple[Any, Path]:
    """Keys, both repositories, the model released and assigned: what a device needs to serve it. ``shadow_device``:
    a second device, ``agent-NAME.toml`` beside the first's, serving the same version with 1.1.0 in shadow."""
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
    onnx = builders.write_onnx_mlp(builders.random_mlp(MODELS[model], seed=1), work / f"{model}.onnx")
    for version in ("1.0.0", "1.1.0") if shadow or shadow_device else ("1.0.0",):
        build(onnx, "m", version, work / f"bundle-{version}", variants=["onnx-fp32"])
        image.release(work / f"bundle-{version}", keys)
    controller = Controller(work / "serve", keys, host, port)
    controller.server.start()
    director.assign("bench", image, "m", "1.0.0", "onnx-fp32", keys, shadow=("1.1.0", "onnx-fp32") if shadow else None)
    if shadow_device:
        director.assign(shadow_device, image, "m", "1.0.0", "onnx-fp32", keys, shadow=("1.1.0", "onnx-fp32"))
    announce(director, ["bench", *([shadow_device] if shadow_device else [])], host, port)
    settings: dict[str, Any] = {
        "device_id": "bench",
        "state_dir": work / "state",
        "log_level": "WARNING",
        "broker": {"host": host, "port": port},
        "update": {"image_root": image.metadata / "1.root.json", "director_root": director.directory / "1.root.json"},
        "serving": {"queue_size": 4096, "client_rps": 0, **serving},  # one load generator: no per-client rate
        "telemetry": {"interval_s": 60, **telemetry},
    }
    if shadow_device:
        write_config(work / f"agent-{shadow_device}.toml", {**settings, "device_id": shadow_device, "state_dir": work / "state-shadow"})
    return controller, write_config(work / "agent.toml", settings)


def _wait_model(client: Client, x: list[list[float]], device: str = "bench") -> None:
    """Until ``device`` answers a request. A request sent before the agent subscribed is gone (no session keeps it),
    so each try waits 1 s, not the minute a throughput round may take."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            client.run(device, x, 1, 1, timeout=1.0)
            return
        except RuntimeError:
            continue
    raise RuntimeError(f"{device} never served the model")


def _wait_shadow(db: Path) -> None:
    """Until the agent's store says the shadow is installed (it is loaded in the same step)."""
    import sqlite3

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(db) as conn:
                if conn.execute("SELECT count(*) FROM installed WHERE status = 'shadow'").fetchone()[0]:
                    return
        except sqlite3.Error:
            pass
        time.sleep(0.2)
    raise RuntimeError("the agent never ran the shadow")


def main() -> None:
    ap, plan_of = arguments("serving: the agent against a raw echo", QUICK_PLAN, FULL_PLAN)
    parts = ["all", "mqtt", "oip", "local"]
    ap.add_argument("--part", choices=parts, default="all", help="MQTT serving rows, OIP REST rows, local-broker rows, or all")
    args = ap.parse_args()
    plan = plan_of(args)
    n_tp, n_lat, window = (400, 60, 16) if args.quick else (1000, 200, 32)
    from fleet.dev.broker import start_broker

    rows: list[dict[str, Any]] = []
    oip_rows: list[dict[str, Any]] = []
    local: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = start_broker(work / "broker")
        try:
            if args.part in ("all", "mqtt"):
                labels = ["default"] if args.quick else list(CONFIGS)
                rows = _mqtt_rows(work, broker.host, broker.port, labels, Load(n_tp, n_lat, window), plan, own_echo=not args.quick)
            if args.part in ("all", "oip"):
                oip_rows = serving_oip.oip_rows(work, broker.host, broker.port, args.quick, _fleet, MODELS, args.repeat)
            if args.part == "local" or (args.part == "all" and not args.quick):
                local = local_broker_rows(work / "local", broker.host, broker.port, Load(n_tp, n_lat, window), plan)
        finally:
            broker.stop()
    _report(rows, window, n_tp, oip_rows, local)


@dataclass(frozen=True)
class Load:
    requests: int  # per throughput round, ``window`` in flight
    latency_requests: int  # per latency round, one at a time
    window: int


@dataclass
class Agents:
    """Agent processes serving one model on the broker, by device id; the echo is the device ``echo``."""

    procs: list[subprocess.Popen[bytes]]
    controller: Any

    def stop(self) -> None:
        for a in self.procs:
            a.send_signal(signal.SIGTERM)
        for a in self.procs:
            a.wait(30)
        self.controller.server.stop()


def _start(work: Path, host: str, port: int, model: str, label: str, shadow_device: str | None) -> Agents:
    serving, telemetry = CONFIGS[label]
    controller, config = _fleet(work, host, port, model, serving, telemetry, False, shadow_device)
    configs = [config, *([work / f"agent-{shadow_device}.toml"] if shadow_device else [])]
    procs = [subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(c)], env=os.environ) for c in configs]
    return Agents(procs, controller)


def _mqtt_rows(work: Path, host: str, port: int, labels: list[str], load: Load, plan: Plan, own_echo: bool) -> list[dict[str, Any]]:
    """Per model and settings: the agent against the echo in each payload form; with the default settings also the
    agent with a shadow against the agent without one, and (``own_echo``) the agent against an echo on its own client."""
    rows = []
    echoes = [subprocess.Popen([sys.executable, "-c", ECHO, host, str(port), d], stdout=subprocess.PIPE, text=True) for d in ECHOES]
    for echo in echoes:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
    client = Client(host, port)
    try:
        for model in MODELS:
            x = np.random.default_rng(0).uniform(-1, 1, (1, MODELS[model][0])).astype(np.float32).tolist()
            for label in labels:
                mwork = work / f"{model}-{label.replace(' ', '-')}"
                mwork.mkdir()
                shadow = "bench-shadow" if label == "default" else None
                agents = _start(mwork, host, port, model, label, shadow)
                try:
                    _wait_model(client, x)
                    for payload, binary in PAYLOADS.items():
                        rps, p50 = _pairs(client, ("echo", "bench"), x, binary, load, plan)
                        rows.append(_row(model, label, payload, "echo", rps, p50))
                        if label == "default" and own_echo:  # the agent's work alone: an echo on the agent's own MQTT client
                            rps, p50 = _pairs(client, ("echo-own", "bench"), x, binary, load, plan)
                            rows.append(_row(model, label, payload, ECHOES["echo-own"], rps, p50))
                    if label == "default" and model == next(iter(MODELS)):  # the harness's own error: echo against echo
                        rps, p50 = _pairs(client, ("echo", "echo-again"), x, False, load, plan)
                        rows.append(_row(model, "none: the same echo again", "JSON", "echo", rps, p50, judged=False))
                    if shadow:
                        _wait_shadow(mwork / "state-shadow" / "agent.db")
                        _wait_model(client, x, shadow)
                        rps, p50 = _pairs(client, ("bench", shadow), x, False, load, plan)
                        rows.append(_row(model, "with a shadow", "JSON", "agent without a shadow", rps, p50))
                finally:
                    agents.stop()
    finally:
        client.close()
        for echo in echoes:
            echo.terminate()
    return rows


def _pairs(client: Client, devices: tuple[str, str], x: list[list[float]], binary: bool, load: Load, plan: Plan) -> tuple[Paired, Paired]:
    """Requests/s and p50 of two devices in alternating rounds (A B, B A, ...) as the plan allows: (rps, p50 ms)."""
    for d in devices:
        client.run(d, x, max(1, load.requests // 4), load.window, binary)  # warm: lazy paths, the broker's routes
    return paired_rounds(lambda subject: _round(client, devices[subject], x, binary, load), plan)


def _round(client: Client, device: str, x: list[list[float]], binary: bool, load: Load) -> tuple[float, float]:
    """One device's round: (requests/s with ``load.window`` in flight, p50 ms one at a time)."""
    rps, _ = client.run(device, x, load.requests, load.window, binary)
    _, rtts = client.run(device, x, load.latency_requests, 1, binary)
    return rps, statistics.median(rtts)


def _row(model: str, label: str, payload: str, baseline: str, rps: Paired, p50: Paired, judged: bool = True) -> dict[str, Any]:
    """One result row: the baseline's and the agent's figures per pair, and whether the issue 18 goals hold. Not
    ``judged``: a row with no goal (the echo against itself: how far from 1 the harness lands when nothing differs)."""
    added = [s - b for b, s in zip(p50.baseline, p50.subject)]
    shadow = baseline not in ECHOES.values()
    judged = judged and baseline != ECHOES["echo-own"]  # against the agent's own client: what the agent's work costs, no goal
    return {
        "model": model,
        "serving": label,
        "payload": payload,
        "baseline": baseline,
        "throughput": rps.to_json(),
        "p50_ms": p50.to_json(),
        "p50_added_ms": round(statistics.median(added), 3),
        "p50_added_range_ms": [round(min(added), 3), round(max(added), 3)],
        "throughput_goal": SHADOW_GOAL if shadow else THROUGHPUT_GOAL,
        "throughput_goal_met": rps.ratio >= (SHADOW_GOAL if shadow else THROUGHPUT_GOAL) if judged else None,
        "latency_goal_met": None if shadow or not judged else statistics.median(added) <= P50_GOAL_MS,
    }


def _report(
    rows: list[dict[str, Any]], window: int, n_tp: int, oip_rows: list[dict[str, Any]], local: list[dict[str, Any]] | None = None
) -> None:
    """The tables on the console, and the JSON and markdown files under ``benchmarks/results``."""
    table = Table(title="serving through mosquitto: the agent against its baseline (batch 1, QoS 1; median of round pairs)")
    header = ["model", "agent serving", "payload", "baseline", "baseline req/s", "agent req/s", "ratio", "spread [min, max]"]
    header += ["goal", "met", "baseline p50 ms", "agent p50 ms", "added ms (goal <= 0.3)", "met"]
    for h in header:
        table.add_column(h)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        t, lat = r["throughput"], r["p50_ms"]
        ratio = f"{t['ratio_median']:.3f}"
        spread = spread_cell(t)
        cells = [r["model"], r["serving"], r["payload"], r["baseline"], f"{t['baseline_median']:.0f}", f"{t['subject_median']:.0f}"]
        goal = f">= {r['throughput_goal']}" if r["throughput_goal_met"] is not None else "-"
        cells += [ratio, spread, goal, yes_no(r["throughput_goal_met"])]
        cells += [f"{lat['baseline_median']:.3f}", f"{lat['subject_median']:.3f}", f"{r['p50_added_ms']:.3f}"]
        cells.append(yes_no(r["latency_goal_met"]))
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console(width=220).print(table)
    md += _oip_report(oip_rows)
    meta = machine()
    local_md = _local_table(local) if local else ""
    payload = {"machine": meta, "window": window, "requests": n_tp, "rows": rows, "oip_rows": oip_rows, "local_broker": local or []}
    paths = write("serving", payload, "\n".join(md) + "\n" + local_md)
    print(f"wrote {paths[0]} and {paths[1]}")


# -- inference on a device-local broker against the fleet's (issue 17) -------------------------------------------


def local_broker_rows(work: Path, host: str, port: int, load: Load, plan: Plan) -> list[dict[str, Any]]:
    """Per model: an agent serving on the fleet's broker ("bench") and one whose inference is on a second mosquitto
    ("bench-local", ``[serving.broker]``), both up at once, measured in alternating pairs as the MQTT rows are (fleet,
    local; then local, fleet), the same client code on each broker. Each pair gives a ratio local/fleet."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    from fleet.dev.broker import start_broker
    from fleet.transport.announce import announce
    from fleet.tuf.director import Director
    from fleet.tuf.image_repo import ImageRepository
    from fleet.tuf.keys import KeyStore

    local = start_broker(work / "local-broker")
    out = []
    try:
        for model in MODELS:
            mwork = work / model
            mwork.mkdir(parents=True)
            controller, config = _fleet(mwork, host, port, model, {}, {}, False)
            settings = tomllib.loads(config.read_text())
            settings["device_id"], settings["state_dir"] = "bench-local", str(mwork / "state-local")
            settings["serving"]["broker"] = {"host": local.host, "port": local.port}
            local_config = write_config(mwork / "agent-local.toml", settings)
            keys, director = KeyStore(mwork / "keys"), Director(mwork / "serve" / "director")
            director.assign("bench-local", ImageRepository(mwork / "serve" / "image"), "m", "1.0.0", "onnx-fp32", keys)
            announce(director, ["bench-local"], host, port)
            agents = [subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(c)]) for c in (config, local_config)]
            clients = {"fleet": (Client(host, port), "bench"), "local": (Client(local.host, local.port), "bench-local")}
            try:
                out.append(_local_pairs(model, clients, load, plan))
            finally:
                for c, _ in clients.values():
                    c.close()
                for a in agents:
                    a.send_signal(signal.SIGTERM)
                    a.wait(30)
                controller.server.stop()
    finally:
        local.stop()
    return out


def _local_pairs(model: str, clients: dict[str, tuple[Client, str]], load: Load, plan: Plan) -> dict[str, Any]:
    x = np.random.default_rng(0).uniform(-1, 1, (1, MODELS[model][0])).astype(np.float32).tolist()
    for client, device in clients.values():
        _wait_model(client, x, device)
        client.run(device, x, max(1, load.requests // 10), load.window)  # warm: the first calls load lazy paths
    rps, p50 = paired_rounds(lambda local: _round(*clients["local" if local else "fleet"], x, False, load), plan)
    return {"model": model, "throughput": rps.to_json(), "p50_ms": p50.to_json()}


def _local_table(rows: list[dict[str, Any]]) -> str:
    header = ["model", "fleet req/s", "local req/s", "ratio", "spread [min, max]", "pairs", "fleet p50 ms", "local p50 ms"]
    header += ["p50 ratio", "p50 spread [min, max]"]
    md = [
        "",
        "Inference on a device-local broker (`[serving.broker]`) against the fleet's broker, both mosquitto on loopback,",
        "alternating pairs; ratio = local / fleet per pair, its median, ± half the interquartile range, [lowest, highest]:",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        t, lat = r["throughput"], r["p50_ms"]
        cells = [r["model"], f"{t['baseline_median']:.0f}", f"{t['subject_median']:.0f}", f"{t['ratio_median']:.3f}"]
        cells += [spread_cell(t), str(t["pairs"])]
        cells += [f"{lat['baseline_median']:.3f}", f"{lat['subject_median']:.3f}", f"{lat['ratio_median']:.3f}"]
        cells.append(spread_cell(lat))
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def _oip_report(rows: list[dict[str, Any]]) -> list[str]:
    """The OIP REST table (benchmarks/serving_oip.py) on the console; its markdown lines."""
    if not rows:
        return []
    header, cells = serving_oip.oip_table(rows)
    table = Table(title="OIP REST: the agent's endpoint vs a bare echo on uvicorn + httptools (same client; median, spread of round pairs)")
    for h in header:
        table.add_column(h)
    for c in cells:
        table.add_row(*c)
    Console().print(table)
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in cells]


if __name__ == "__main__":
    main()
