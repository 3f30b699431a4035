"""The processes the scale benchmark starts: controllers, simulator shards, telemetry publishers, raw subscribers.

Why processes: on a 2-core machine one Python process is one core at best (the GIL); 10,000 simulated devices,
two controllers and the publishers each need their own, and the controllers' CPU and RSS must be measured apart
from everything else. ``python -m benchmarks.scale_procs KIND ...`` runs one of them; ``benchmarks.scale``
starts them through the functions here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent import wire
from agent.mqtt import tcp_nodelay
from agent.wire import device_topic

__all__ = [
    "Serve",
    "controller_process",
    "device_ids",
    "go",
    "start_publishers",
    "wait_published",
    "raw_subscriber",
    "register_devices",
    "simulator_process",
]

PUBLISHERS = 2  # telemetry publisher processes in the ingest comparison


class Serve:
    """One controller process; its log says whether it leads (``event=leader.acquired``) or stands by."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log = proc, log

    def says(self, event: str) -> bool:
        return self.log.exists() and f"event={event}" in self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def controller_process(root: Path, keys: Path, config: Path, options: dict[str, Any], log: Path) -> Serve:
    """A controller on ``config`` (fleet.toml: store and broker). No ``options``: ``fleet serve`` itself, as shipped.
    With options (``Controller`` keywords ``fleet serve`` does not expose, e.g. ``shared_ingest``): the same start and
    stop around ``Controller(**options)`` (``serve`` below)."""
    controller_id = log.stem  # two controllers on one ROOT and host need ids of their own (the default is host + ROOT)
    if options:
        options = {**options, "controller_id": controller_id}
        cmd = [sys.executable, "-m", "benchmarks.scale_procs", "serve", str(root), str(keys), str(config), json.dumps(options)]
    else:
        cmd = [sys.executable, "-m", "fleet.cli", "serve", str(root), "--keys", str(keys), "--config", str(config)]
        cmd += ["--controller-id", controller_id]
    with open(log, "wb") as err:
        return Serve(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err), log)


def _serve(root: Path, keys: Path, config: Path, options: dict[str, Any]) -> None:
    """What ``fleet serve --config`` does (log to stderr, start, wait for SIGTERM, stop), with extra ``Controller`` options."""
    from agent import logs
    from fleet.controller import Controller
    from fleet.settings import load_settings
    from fleet.tuf.keys import KeyStore

    logs.configure()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    settings = load_settings(config)
    controller = Controller(root, KeyStore(keys), store=settings.store, broker=settings.broker, **options).start()
    while not stop.wait(0.2) and controller.healthy():
        pass
    controller.stop()


def simulator_process(host: str, port: int, prefix: str, count: int, telemetry_s: float, out: Path) -> subprocess.Popen[bytes]:
    """One shard of the simulated fleet (``count`` devices named ``PREFIX-NNNN``, on model m 1.0.0). It writes ``out``
    once every device is connected (``{"ready": true}``), and again when SIGTERM stopped it: what it sent, per device
    the telemetry batches the broker acknowledged."""
    cmd = [sys.executable, "-m", "benchmarks.scale_procs", "simulate", host, str(port), prefix, str(count), str(telemetry_s), str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "wb"))


def _simulate(host: str, port: int, prefix: str, count: int, telemetry_s: float, out: Path) -> None:
    from fleet.dev.simulate import Simulator

    sim = Simulator(host, port, count, prefix, telemetry_s=telemetry_s, initial={"m": "1.0.0"})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # Not loop.add_signal_handler: that passes the signal to the loop as a byte through its self-pipe, which 2,500
        # devices' thread-safe wake-ups can fill; the SIGTERM was then dropped (BlockingIOError in _sighandler_noop, in
        # the shard's log) and the shard never stopped. call_soon_threadsafe queues the stop itself; its wake-up byte
        # may be dropped harmlessly (the loop is busy, or the signal interrupted its select).
        signal.signal(signal.SIGTERM, lambda *_: loop.call_soon_threadsafe(sim.stop))
        await sim.run(lambda: _write(out, {"ready": True}))
        # written here, not after asyncio.run: its shutdown waits without a limit for any device task that swallowed
        # its cancellation (a disconnect timing out on a loaded machine), and the benchmark waits for this report
        _write(out, {"sent": sim.sent, "reconnects": sim.reconnects, "acked": {d.id: d.acked for d in sim.devices}})

    asyncio.run(main())


def _write(path: Path, data: dict[str, Any]) -> None:
    """Written whole, then renamed: the benchmark polls for the file and must never read half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def register_devices(host: str, port: int, devices: list[str]) -> None:
    """Each device's retained ``status`` (ready), as a connected device leaves it: a controller starting later registers
    every one (retained messages are the broker's record of the fleet and always register; live newcomers are
    budgeted at 1,000 a minute)."""
    c = _client(host, port, "bench-register")
    last = None
    for d in devices:
        body = wire.encode(wire.Status(state="ready", session=1, ts=time.time()))
        last = c.publish(device_topic(d, "status"), body, qos=1, retain=True)
    if last is not None:
        last.wait_for_publish(120)
    c.disconnect()
    c.loop_stop()


def _client(host: str, port: int, client_id: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_socket_open = tcp_nodelay
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(host, port)
    c.loop_start()
    return c


def device_ids(prefix: str, count: int) -> list[str]:
    """The ingest comparison's device ids (``PREFIX-NNNNN``)."""
    return [f"{prefix}-{i:05d}" for i in range(count)]


def start_publishers(host: str, port: int, prefix: str, devices: int, n: int, session: int) -> list[subprocess.Popen[str]]:
    """``PUBLISHERS`` processes that will send ``n`` telemetry batches (the agent's wire model, QoS 1) from
    ``device_ids(prefix, devices)`` in turn; each connects, says so and waits for ``go`` (so process start-up is not
    timed). ``session`` makes each round's (device, session, seq) new."""
    share = n // PUBLISHERS
    procs = []
    for k in range(PUBLISHERS):
        count = share if k < PUBLISHERS - 1 else n - k * share
        args = [host, str(port), str(k * share), str(count), str(session), prefix, str(devices)]
        cmd = [sys.executable, "-m", "benchmarks.scale_procs", "publish", *args]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for p in procs:
        if p.stdout is None or p.stdout.readline().strip() != "connected":
            raise RuntimeError(f"a telemetry publisher did not connect (exit {p.poll()})")
    return procs


def go(procs: list[subprocess.Popen[str]]) -> float:
    """Let the publishers send; the moment they were told (``time.monotonic``)."""
    t0 = time.monotonic()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    return t0


def wait_published(procs: list[subprocess.Popen[str]]) -> None:
    """Until every publisher had every message acknowledged by the broker and exited."""
    for p in procs:
        if p.wait(600):
            raise RuntimeError(f"a telemetry publisher exited with {p.returncode}")


def _publish(host: str, port: int, first: int, count: int, session: int, devices: list[str]) -> None:
    c = _client(host, port, f"bench-pub-{session}-{first}")
    print("connected", flush=True)
    sys.stdin.readline()  # "go"
    system = wire.SystemMetrics(cpu_percent=10.0, process_cpu_percent=5.0, rss_bytes=50 * 2**20, memory_percent=20.0)
    window = [wire.ModelWindow(model="m", version="1.0.0", count=50, p95_ms=2.0)]
    last = None
    for i in range(first, first + count):
        device = devices[i % len(devices)]
        body = wire.TelemetryBatch(
            device_id=device,
            session=session,
            seq=i // len(devices) + 1,
            ts=time.time(),
            interval_s=10.0,
            dropped_total=0,
            models=window,
            throughput_rps=5.0,
            queue_depth=0,
            system=system,
        )
        last = c.publish(device_topic(device, "telemetry"), wire.encode(body), qos=1)
    if last is not None:
        last.wait_for_publish(300)
    c.disconnect()
    c.loop_stop()


def raw_subscriber(host: str, port: int, group: str, index: int, counter: Any, ready: Any, stop: Any) -> None:
    """The baseline (a ``multiprocessing`` target): a plain paho client in the ``$share/GROUP`` group on every device's
    telemetry, QoS 1, that only counts what it receives (``counter``, a shared integer). ``ready`` once subscribed."""

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        counter.value += 1

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{index}", protocol=mqtt.MQTTv5)
    c.on_socket_open = tcp_nodelay
    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    c.connect(host, port)
    c.subscribe(f"$share/{group}/{wire.device_filter('telemetry')}", qos=1)
    c.loop_start()
    stop.wait(900)
    c.disconnect()
    c.loop_stop()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale_procs")
    sub = ap.add_subparsers(dest="kind", required=True)
    sub.add_parser("serve").add_argument("args", nargs=4)  # ROOT KEYS CONFIG OPTIONS_JSON
    sub.add_parser("simulate").add_argument("args", nargs=6)  # HOST PORT PREFIX COUNT TELEMETRY_S OUT
    sub.add_parser("publish").add_argument("args", nargs=7)  # HOST PORT FIRST COUNT SESSION PREFIX DEVICES
    parsed = ap.parse_args()
    a = parsed.args
    if parsed.kind == "serve":
        _serve(Path(a[0]), Path(a[1]), Path(a[2]), json.loads(a[3]))
    elif parsed.kind == "simulate":
        _simulate(a[0], int(a[1]), a[2], int(a[3]), float(a[4]), Path(a[5]))
    else:
        _publish(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), device_ids(a[5], int(a[6])))


if __name__ == "__main__":
    main()
