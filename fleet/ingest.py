"""Take the devices' retained status/reported, job updates and telemetry off MQTT into the store, in batches.

paho's thread only parses and appends to a buffer; a flusher writes the buffer in one
transaction every ``flush_s`` (or sooner when it holds ``batch`` messages), so the
store sees a few large transactions instead of one per message.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from typing import Any

import paho.mqtt.client as mqtt

from agent import logs
from agent.mqtt import default_protocol
from agent.protocol import ROOT, tcp_nodelay
from fleet.store import FleetStore

__all__ = ["Ingestor"]

log = logging.getLogger("edgefleet.ingest")

KINDS = {"status": "status", "reported": "reported", "telemetry": "telemetry", "jobs": "job"}


class Ingestor:
    def __init__(
        self, store: FleetStore, host: str, port: int, client_id: str = "edgefleet-ingest", flush_s: float = 0.1, batch: int = 5000
    ) -> None:
        self.store, self.flush_s, self.batch = store, flush_s, batch
        self.counters: Counter[str] = Counter()
        self._buffer: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._full = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=default_protocol())
        self._client.on_socket_open = tcp_nodelay
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a: self._ready.set()
        self._host, self._port = host, port
        self._thread = threading.Thread(target=self._flush_loop, name="ingest-flush", daemon=True)

    def start(self, timeout: float = 10.0) -> Ingestor:
        self._thread.start()
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if not self._ready.wait(timeout):
            raise ConnectionError(f"ingest could not subscribe on {self._host}:{self._port}")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._stop.set()
        self._full.set()
        self._thread.join(10)
        self.flush()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe([(f"{ROOT}/dev/+/{k}", 1) for k in ("status", "reported", "telemetry")] + [(f"{ROOT}/dev/+/jobs/+", 1)])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")  # edgefleet/v1/dev/{id}/{kind}[/{job}]
        kind = KINDS.get(parts[4]) if len(parts) >= 5 else None
        if kind is None or not msg.payload:
            return  # an empty retained message clears a topic; nothing to store
        try:
            data = json.loads(msg.payload)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            self.counters["bad"] += 1
            logs.event(log, "ingest.bad_message", logging.WARNING, topic=msg.topic[:120], reason=str(exc)[:200])
            return
        with self._lock:
            self._buffer.append((parts[3], kind, data))
            full = len(self._buffer) >= self.batch
        self.counters[kind] += 1
        if full:
            self._full.set()

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._full.wait(self.flush_s)
            self._full.clear()
            try:
                self.flush()
            except Exception as exc:  # the store failing must not lose the buffer silently: logged, retried next round
                logs.event(log, "ingest.flush_failed", logging.ERROR, reason=f"{type(exc).__name__}: {exc}")

    def flush(self) -> int:
        with self._lock:
            batch, self._buffer = self._buffer, []
        if not batch:
            return 0
        try:
            n = self.store.ingest(batch)
        except Exception:
            with self._lock:
                self._buffer[:0] = batch  # back to the front, in order
            raise
        self.counters["stored"] += n
        return n

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until everything received so far is stored (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                empty = not self._buffer
            if empty:
                return
            time.sleep(0.02)
