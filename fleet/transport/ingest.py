"""Take the devices' retained status/reported, job updates and telemetry off MQTT into the store, in batches.

paho's thread only parses and appends to a buffer; a flusher writes the buffer in one
transaction every ``flush_s`` (or sooner when it holds ``batch`` messages), so the
store sees a few large transactions instead of one per message.

The ingest's session is persistent and its client id stable (``edgefleet-ingest-{controller id}``): when its broker
node goes and it fails over to another node of a cluster, or the controller is restarted (after ``kill -9`` too),
the broker kept the QoS 1 messages devices published meanwhile (a device's batch left its outbox at the broker's
acknowledgement, so a clean session here would lose it). Messages are acknowledged only once the transaction that
stored them has committed (paho's manual acknowledgement): what a controller received and had not stored when it
died is sent again by the broker to the same session, to the controller when it comes back or to the leader that
took its session over (``fleet.transport.adopt``). Measured on mosquitto 2.0.11 with two shared-subscription
members, one killed with SIGKILL and restarted under its id: acknowledging on receipt lost 228 of 20,000 messages,
acknowledging after the write none (the broker also kept queuing the dead member's share until it returned).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

import paho.mqtt.client as mqtt

from agent import logs, wire
from agent.settings import BrokerSettings
from fleet.store import FleetStore
from fleet.transport import client as transport

__all__ = ["Ingestor"]

log = logging.getLogger("edgefleet.ingest")

NEW_DEVICES_PER_MINUTE = 1000  # a fleet onboarding faster than this registers over several minutes


class Ingestor:
    def __init__(
        self,
        store: FleetStore,
        host: str | None = None,
        port: int | None = None,
        client_id: str = "edgefleet-ingest",
        flush_s: float = 0.1,
        batch: int = 5000,
        broker: BrokerSettings | None = None,
        new_devices_per_minute: int = NEW_DEVICES_PER_MINUTE,
        group: str | None = None,
        resume: bool = False,
        adopted: bool = False,
    ) -> None:
        """``broker``: TLS, credentials and MQTT version (fleet.toml's ``[broker]``); ``host``/``port`` replace its address.

        ``group``: several controllers share telemetry and job updates through the MQTT 5 shared subscription
        ``$share/GROUP/...`` (each message reaches one of them). Retained status and reports stay plain subscriptions:
        every controller sees every device's presence (a shared subscription gets no retained messages), and writing
        them twice is harmless.
        ``resume``: take up the session the broker kept for ``client_id`` (a stable id: what a previous life of this
        controller received and did not acknowledge, and what was queued for it since, comes now); False: a fresh one.
        ``adopted``: this is another controller's session, held by the leader while that one is dead: when the broker
        hands it back to its owner (session taken over), this client ends instead of taking it again."""
        self.store, self.flush_s, self.batch = store, flush_s, batch
        self.counters: Counter[str] = Counter()
        # devices registered so far; an unknown id registers only within the budget of new ones per minute
        self._known = {d.id for d in store.devices()}
        self.new_devices_per_minute = new_devices_per_minute
        self._minute, self._new_this_minute = 0, 0
        self._buffer: list[tuple[str, wire.WireModel, float]] = []
        self._replayed: list[bool] = []  # beside the buffer: each message one the broker replayed (not live): ``flush``
        self._acks: list[tuple[int, int]] = []  # (mid, qos) of every message in the buffer: acknowledged once stored
        self._lock = threading.Lock()
        self._full = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._group, self._resume, self.adopted = group, resume, adopted
        self.client_id = client_id
        self.ended = threading.Event()  # an adopted session went back to its owner
        self._broker = transport.broker_settings(host, port, broker)
        self._client = transport.client(self._broker, client_id, persistent=True)
        self._client.manual_ack_set(True)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = lambda *a: self._ready.set()
        self._host, self._port = self._broker.host, self._broker.port
        self._thread = threading.Thread(target=self._flush_loop, name="ingest-flush", daemon=True)

    def start(self, timeout: float = 10.0) -> Ingestor:
        self._thread.start()
        transport.connect(self._client, self._broker, persistent=True, resume=self._resume)
        self._client.loop_start()
        if not self._ready.wait(timeout):
            raise ConnectionError(f"ingest could not subscribe on {self._host}:{self._port}")
        return self

    def stop(self, forget: bool = True) -> None:
        """Unsubscribe (``forget``), store and acknowledge what arrived, leave. The session stays for what arrived after
        the flush (the leader drains it, or this controller when it comes back); unsubscribed, the group stops giving
        it a share. ``forget`` False: the broker goes on queuing its share for it (nobody else gets that share meanwhile)."""
        if forget and self._client.is_connected():
            self._client.unsubscribe(self._filters())  # the persistent session queues nothing more for us
        self._stop.set()
        self._full.set()
        self._thread.join(10)
        try:
            self.flush()
        except Exception as exc:  # not acknowledged: the broker sends them again to this session
            logs.event(log, "ingest.flush_failed", logging.ERROR, reason=f"{type(exc).__name__}: {exc}")
        self._client.disconnect()
        self._client.loop_stop()

    def _filters(self) -> list[str]:
        """Retained presence and reports by plain subscription (every controller keeps the registry); telemetry and job
        updates in the shared group when one is given."""
        shared = [wire.device_filter("telemetry"), wire.device_filter("jobs", "+")]
        if self._group:
            shared = [f"$share/{self._group}/{f}" for f in shared]
        return [wire.device_filter("status"), wire.device_filter("reported"), *shared]

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.ended.is_set():
            return
        if self.adopted:  # drain, and detach: the group stops giving a dead member a share (its owner subscribes again
            client.unsubscribe(self._filters())  # when it comes back); what the session holds is still delivered
            self._ready.set()
            return
        client.subscribe([(f, 1) for f in self._filters()])

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        """An adopted session taken back by its owner (or any drop of one: its owner may be back) ends here: reconnecting
        would take it from the owner again. What was received and not acknowledged goes to the owner."""
        if self.adopted and not self.ended.is_set():
            self.ended.set()
            with self._lock:
                self._buffer.clear()  # not acknowledged: the broker hands them to the owner's session
                self._replayed.clear()
                self._acks.clear()
            client.disconnect()  # paho's loop stops reconnecting
            logs.event(log, "ingest.adoption_ended", client_id=self.client_id, reason=str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's thread: decode with the wire's caps, stamp the receive time, buffer (acknowledged once stored); what
        is not stored is acknowledged at once. Nothing here may raise."""
        if not self._take(msg):
            self._ack([(msg.mid, msg.qos)])

    def _take(self, msg: mqtt.MQTTMessage) -> bool:
        """Buffered (True) or dropped (False, counted where it is news)."""
        if not msg.payload:
            return False  # an empty retained message clears a topic; nothing to store
        try:
            topic = wire.parse_device_topic(msg.topic)
            message = wire.decode_device_message(topic, bytes(msg.payload))
        except wire.WireError as exc:
            self._bad(msg, str(exc))
            return False
        except Exception as exc:  # a bug here must cost one message, never paho's thread (it re-raises and dies)
            self._bad(msg, f"{type(exc).__name__}: {exc}")
            return False
        now = time.time()
        # a retained message is the broker's (ACL-confined) record of a device, delivered at our subscription: a
        # controller starting against a large fleet must take them all; the budget is for live newcomers
        if msg.retain:
            self._known.add(topic.device)
        elif topic.device not in self._known and not self._may_register(topic.device, now):
            self.counters["unregistered"] += 1
            return False
        with self._lock:
            self._buffer.append((topic.device, message, now))
            self._replayed.append(bool(msg.retain or msg.dup))  # retained at a subscription, or sent again
            self._acks.append((msg.mid, msg.qos))
            full = len(self._buffer) >= self.batch
        self.counters[topic.kind] += 1
        if full:
            self._full.set()
        return True

    def _ack(self, acks: list[tuple[int, int]]) -> None:
        """One write for the lot; a connection gone: the broker sends them again, the store keeps each once."""
        try:
            self._client.ack_many(acks)
        except Exception as exc:
            logs.event(log, "ingest.ack_failed", logging.WARNING, reason=f"{type(exc).__name__}: {exc}"[:200])

    def alive(self) -> bool:
        """paho's network thread and the flusher run (part of the controller's health)."""
        network = getattr(self._client, "_thread", None)
        return network is not None and network.is_alive() and self._thread.is_alive()

    def _may_register(self, device: str, now: float) -> bool:
        """A new device id within this minute's budget. 20,000 ghost ids in 5.5 s from one client once filled the
        registry: past the budget a new id's messages are dropped and counted (``unregistered``), and logged once a
        minute; a real device's retained status and reports arrive again when the budget allows (it reconnects)."""
        minute = int(now // 60)
        if minute != self._minute:
            if self._minute and self._new_this_minute >= self.new_devices_per_minute:
                logs.event(log, "ingest.registrations_limited", logging.WARNING, refused=self.counters["unregistered"])
            self._minute, self._new_this_minute = minute, 0
        if self._new_this_minute >= self.new_devices_per_minute:
            return False
        self._new_this_minute += 1
        self._known.add(device)
        self.counters["registered"] += 1
        return True

    def _bad(self, msg: mqtt.MQTTMessage, reason: str) -> None:
        self.counters["bad"] += 1
        logs.event(log, "ingest.bad_message", logging.WARNING, topic=msg.topic[:120], size=len(msg.payload), reason=reason[:200])

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._full.wait(self.flush_s)
            self._full.clear()
            try:
                self.flush()
            except Exception as exc:  # the store failing must not lose the buffer silently: logged, retried next round
                logs.event(log, "ingest.flush_failed", logging.ERROR, reason=f"{type(exc).__name__}: {exc}")

    def flush(self) -> int:
        """Store the buffer in one transaction, then acknowledge its messages to the broker (not before: a controller
        killed in between has them sent again, and the store keeps each telemetry batch once)."""
        with self._lock:
            batch, self._buffer = self._buffer, []
            replayed, self._replayed = self._replayed, []
            acks, self._acks = self._acks, []
        if not batch:
            return 0
        try:  # a replay (retained at a subscription, or a QoS 1 message sent again) may be older than what is held
            n = self.store.ingest(batch, {i for i, r in enumerate(replayed) if r})
        except Exception:
            with self._lock:
                self._buffer[:0] = batch  # back to the front, in order
                self._replayed[:0] = replayed
                self._acks[:0] = acks
            raise
        self._ack(acks)
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
