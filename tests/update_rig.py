"""A small real fleet for the agent tests: keys, both repositories, a repository server, bundles good and bad."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import paho.mqtt.client as mqtt
from onnx import helper, numpy_helper

from agent.files import sha256_file
from agent.settings import AgentSettings, load_settings, write_config
from agent.wire import REPO_REQUESTS
from converters.build import build
from fleet.controller import Controller
from fleet.dev.broker import RunningBroker
from fleet.transport.announce import announce
from fleet.tuf.director import Director
from fleet.tuf.image_repo import ImageRepository
from fleet.tuf.keys import KeyStore, init_keys

MODEL = "mlp"
VARIANT = "onnx-fp32"


class Rig:
    def __init__(self, root: Path, source: Path, broker: RunningBroker) -> None:
        self.root, self.source, self.broker = root, source, broker
        self.keys: KeyStore = init_keys(root / "keys")
        self.serve = root / "serve"
        self.image = ImageRepository.create(self.serve / "image", self.keys)
        self.image.chunk_size = 4096  # ~27 chunks per artifact: resumes and windows get exercised
        self.director = Director.create(self.serve / "director", self.keys)
        self.controller = Controller(self.serve, self.keys, broker.host, broker.port)

    def bundle(self, version: str, tamper: Callable[[Path], None] | None = None) -> Path:
        out = self.root / "bundles" / f"{MODEL}-{version}"
        if not out.exists():
            build(self.source, MODEL, version, out, variants=[VARIANT])
            if tamper is not None:
                tamper(out)
        return out

    def release(self, version: str, tamper: Callable[[Path], None] | None = None) -> None:
        if self.image.release_of(MODEL, version) is None:
            self.image.release(self.bundle(version, tamper), self.keys)

    def assign(self, device: str, version: str) -> None:
        self.director.assign(device, self.image, MODEL, version, VARIANT, self.keys)
        announce(self.director, [device], self.broker.host, self.broker.port)

    def settings(self, device: str, runtime: str = "", **update: Any) -> AgentSettings:
        return load_settings(self.write_config(device, runtime, **update))

    def write_config(self, device: str, runtime: str = "", **update: Any) -> Path:
        """The TOML a packaged agent would read (used by the subprocess tests); ``runtime`` is raw [runtime] TOML."""
        state = self.root / "devices" / device
        config = write_config(
            state / "agent.toml",
            {
                "device_id": device,
                "state_dir": state,
                "broker": {"host": self.broker.host, "port": self.broker.port},
                "update": {
                    "image_root": self.image.metadata / "1.root.json",
                    "director_root": self.director.directory / "1.root.json",
                    "retry_s": 0.3,
                    "request_timeout_s": 2.0,
                    "sync_kb": 4,
                    **update,
                },
            },
        )
        if runtime:
            config.write_text(config.read_text() + f"[runtime]\n{runtime}\n")
        return config

    def relay(self, client_id: str, on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]) -> mqtt.Client:
        """Stop the controller's repository server and answer the devices' repository requests with ``on_message``
        (a man in the middle: the tests forward, tamper, truncate or hold replies). The caller stops the loop."""
        self.controller.server.stop()
        relay = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        relay.on_message = on_message
        relay.connect(self.broker.host, self.broker.port)
        relay.subscribe(REPO_REQUESTS, qos=1)
        relay.loop_start()
        return relay


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- bad bundles, each the kind of mistake a real pipeline makes ---------------------------


def _rewrite_variant_file(bundle: Path, data: bytes) -> None:
    """Replace the model file and fix its record, as a converter with a bug would have written it."""
    manifest = json.loads((bundle / "bundle.json").read_text())
    variant = manifest["variants"][0]
    (bundle / variant["file"]).write_bytes(data)
    variant["sha256"], variant["size"] = sha256_file(bundle / variant["file"]), len(data)
    (bundle / "bundle.json").write_text(json.dumps(manifest))


def wrong_golden_outputs(bundle: Path) -> None:
    """A model that loads but answers wrongly: its golden outputs no longer match what it computes."""
    golden = next(bundle.glob("golden_*.npz"))
    with np.load(golden) as z:
        data = {k: (z[k] + 1.0 if k.startswith("out:") else z[k]) for k in z.files}
    np.savez(golden, **data)  # type: ignore[arg-type]


def unloadable_model(bundle: Path) -> None:
    """A model file no runtime can parse (a truncated export)."""
    model = next(bundle.glob("*.onnx"))
    _rewrite_variant_file(bundle, model.read_bytes()[: model.stat().st_size // 3])


def fails_beyond_batch_one(bundle: Path) -> None:
    """Right answers for one row (so it passes the health check), an error for any larger batch: fails in service."""
    path = next(bundle.glob("*.onnx"))
    m = onnx.load(str(path))
    out = m.graph.output[0]
    width = out.type.tensor_type.shape.dim[-1].dim_value
    inner = out.name + "_inner"
    for node in m.graph.node:
        node.output[:] = [inner if o == out.name else o for o in node.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, width], dtype=np.int64), "one_row"))
    m.graph.node.append(helper.make_node("Reshape", [inner, "one_row"], [out.name]))
    _rewrite_variant_file(bundle, m.SerializeToString())
    golden = next(bundle.glob("golden_*.npz"))
    with np.load(golden) as z:
        data = {k: z[k][:1] for k in z.files}
    np.savez(golden, **data)  # type: ignore[arg-type]


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


class Subscriber:
    """A plain MQTT client that keeps every message per topic (a persistent session when asked)."""

    def __init__(self, broker: RunningBroker, topics: list[str], client_id: str, persistent: bool = False) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def payloads(self, topic: str | None = None) -> list[bytes]:
        """Payloads on ``topic`` (every topic when None), in arrival order."""
        with self._lock:
            return [p for t, p in self.messages if topic is None or t == topic]

    def json(self, topic: str | None = None) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.payloads(topic) if p]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AgentProcess:
    """``edge-agent run`` as systemd would start it, with its log in a file."""

    running: list[AgentProcess] = []  # killed after each test by conftest, whatever the test's outcome

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        AgentProcess.running.append(self)
        self.log = log
        self.stderr = open(log, "ab")  # closed in stop()/kill9()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            env={**os.environ, **(env or {})},
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.stderr.close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # thread dump into the log, then fail with it
            time.sleep(1)
            self.proc.kill()
            raise AssertionError("the agent did not stop on SIGTERM:\n" + self.text()[-6000:]) from None
        finally:
            self.stderr.close()
