"""The controller's online side: serve both repositories over MQTT, keep their online metadata fresh, tell devices.

Devices learn that the director changed from a retained message on
``dev/{id}/director/timestamp`` (the signed timestamp, so a device that connects
later still sees it); they then fetch and verify everything through the
repository server, so the message is a hint and never trusted by itself.
Online metadata (image snapshot/timestamp, every device's director metadata) is
re-signed when less than half of its lifetime is left.
With a store, several controllers may serve one fleet: all serve and ingest, and the
one holding the store's leader lock (``fleet.leader``) alone runs rollouts and
re-signs; the others retry the lock every tick and take over when the leader dies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from tuf.api.metadata import Metadata

from agent import logs, wire
from agent.errors import EdgefleetError
from agent.settings import BrokerSettings
from agent.wire import WireError
from fleet.leader import Leadership, identity
from fleet.rollout import RolloutEngine
from fleet.store import FleetStore, StoreLocation
from fleet.transport import client as transport
from fleet.transport.adopt import Adoptions
from fleet.transport.announce import announce
from fleet.transport.ingest import Ingestor
from fleet.transport.repo_server import RepositoryServer
from fleet.tuf.director import Director
from fleet.tuf.image_repo import ImageRepository
from fleet.tuf.keys import KeyStore

__all__ = ["Controller", "ControllerIdInUse", "DeviceReport", "default_controller_id", "devices"]

log = logging.getLogger("edgefleet.controller")

INGEST_GROUP = "edgefleet-ingest"  # the MQTT 5 shared-subscription groups several controllers split the work in
REPO_GROUP = "edgefleet-repo"
ADOPT_EVERY_S = 5.0  # how often the leader looks for dead controllers whose ingest sessions it takes over


class ControllerIdInUse(EdgefleetError):
    """Another running controller has this id: two would take each other's ingest session in turn."""

    code = "controller_id_in_use"


def default_controller_id(root: Path) -> str:
    """This host's name and a hash of ROOT: stable across restarts (the ingest session is found again), different for
    two controllers on one host with their own ROOTs. Two sharing a ROOT on one host need ``controller_id`` set."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    host = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in socket.gethostname())[:60] or "host"
    return f"{host}-{digest}"


@dataclass
class DeviceReport:
    device_id: str
    status: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "status": self.status, "reported": self.reported}


def devices(
    host: str | None = None, port: int | None = None, wait: float = 1.0, broker: BrokerSettings | None = None
) -> list[DeviceReport]:
    """What every device last said about itself (its retained ``status`` and ``reported`` messages), decoded by the wire.

    ``broker``: TLS, credentials, MQTT version (fleet.toml's ``[broker]``); ``host``/``port`` replace its address.
    """
    found: dict[str, DeviceReport] = {}
    lock = threading.Lock()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = wire.parse_device_topic(msg.topic)
            message = wire.decode_device_message(topic, bytes(msg.payload))
        except WireError as exc:
            logs.event(log, "devices.bad_message", logging.WARNING, topic=msg.topic[:120], reason=str(exc)[:200])
            return
        with lock:
            report = found.setdefault(topic.device, DeviceReport(topic.device))
            setattr(report, topic.kind, message.model_dump(exclude_none=True))

    answered = threading.Event()
    refused: list[str] = []

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        else:
            client.subscribe([(wire.device_filter("status"), 1), (wire.device_filter("reported"), 1)])
        answered.set()

    b = transport.broker_settings(host, port, broker)
    c = transport.client(b, f"edgefleet-devices-{time.monotonic_ns() % 10**9}")
    c.on_message = on_message
    c.on_connect = on_connect
    transport.connect(c, b)
    c.loop_start()
    try:
        # "no devices" must never stand for "not let in": a refused or silent broker is an error (ConnectionError)
        if not answered.wait(max(wait, 10.0)) or refused:
            raise ConnectionError(f"the broker did not accept the connection: {refused[0] if refused else 'no answer'}")
        time.sleep(wait)  # retained messages arrive right after the subscription
    finally:
        c.disconnect()
        c.loop_stop()
    with lock:
        return sorted(found.values(), key=lambda d: d.device_id)


def _expires_soon(md: Metadata[Any], lifetime_s: float, now: datetime) -> bool:
    return (md.signed.expires - now).total_seconds() < lifetime_s / 2


class Controller:
    """``fleet serve``: the repository server, the re-signing loop and, with a store, ingest and rollouts.

    ``broker`` (fleet.toml's ``[broker]``: TLS, credentials, MQTT version) is handed to every client the controller
    makes; ``host``/``port`` replace its address (``--broker HOST:PORT``). Neither: plain TCP to 127.0.0.1:1883.
    ``shared_ingest``: with MQTT 5, telemetry and job updates go to one of several controllers (``$share``) instead of
    all of them (None, the default: so with a store on an MQTT 5 broker). Nothing is lost when one dies: messages are
    acknowledged once stored, the session survives under the controller's stable ``controller_id`` (default: host name
    and a hash of ROOT), and the leader takes a dead controller's session over (``fleet.transport.adopt``).
    """

    def __init__(
        self,
        root: Path,
        keys: KeyStore,
        host: str | None = None,
        port: int | None = None,
        interval_s: float = 60.0,
        store: StoreLocation | None = None,
        tick_s: float = 1.0,
        telemetry_keep_s: float = 7 * 86400,
        broker: BrokerSettings | None = None,
        shared_ingest: bool | None = None,
        controller_id: str | None = None,
    ) -> None:
        self.controller_id = controller_id or default_controller_id(root)
        self.image = ImageRepository(root / "image")
        self.broker = transport.broker_settings(host, port, broker)
        self.host, self.port = self.broker.host, self.broker.port
        self.keys, self.interval_s, self.tick_s = keys, interval_s, tick_s
        self.telemetry_keep_s = telemetry_keep_s
        # several controllers on one store split repository requests and the ingest of telemetry and job updates with
        # MQTT 5 shared subscriptions (a request lost with a dying controller is asked again by the device; a message
        # is acknowledged once stored, so a dying controller's are sent again to its session: see fleet.transport.ingest).
        # On a broker without $share (3.1.1: NATS, whose MQTT clients get no queue groups) only the leader serves the
        # repository (every controller answering would send every chunk N times), and every controller ingests
        # everything: the store keeps each telemetry batch once by (device, session, seq).
        self.shared = store is not None and self.broker.mqtt_version == "5"
        self.store: FleetStore | None = None
        self.ingest: Ingestor | None = None
        self.engine: RolloutEngine | None = None
        self.leadership: Leadership | None = None  # None: no store, so no other controller to share with: always leads
        self.identity: Leadership | None = None
        self.adoptions: Adoptions | None = None
        if store is not None:
            self.store = FleetStore(store)
            self.identity = identity(store, self.controller_id)
            if not self.identity.try_acquire():
                self.store.close()
                raise ControllerIdInUse(f"another running controller has the id {self.controller_id!r}: give each its own controller_id")
            self.leadership = Leadership(store)
        # the director's metadata: with a store, signed into it by the leader and served from it by every controller;
        # without, files under ROOT/director (fleet.tuf.director_repos)
        self.director = Director(root / "director", store=self.store)
        # one client id per process: a second controller (or a test's) must not take this one's session over
        self.server = RepositoryServer(
            root,
            client_id=f"edgefleet-repo-{os.getpid()}",
            broker=self.broker,
            group=REPO_GROUP if self.shared else None,
            accepting=store is None or self.shared,
            director_store=self.store,
        )
        if store is not None and self.store is not None:
            self._ingest_and_rollouts(store, self.store, shared_ingest)
        self._next_adoption = 0.0
        self._next_refresh = time.monotonic() + interval_s
        self._leading: bool | None = None  # None until the first try: "standby" is logged once, then only changes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="controller", daemon=True)

    def _ingest_and_rollouts(self, location: StoreLocation, fs: FleetStore, shared_ingest: bool | None) -> None:
        """With a store: this controller's ingest (its stable session), its registration, the adoptions it makes when
        it leads, and the rollout engine."""
        group = INGEST_GROUP if self.shared and shared_ingest is not False else None
        b = self.broker

        def ingestor(client_id: str, adopted: bool = False) -> Ingestor:
            return Ingestor(fs, client_id=client_id, broker=b, group=group, resume=True, adopted=adopted)

        client_id = f"edgefleet-ingest-{self.controller_id}"
        self.ingest = ingestor(client_id)
        fs.register_controller(self.controller_id, client_id, socket.gethostname())
        self.adoptions = Adoptions(fs, location, self.controller_id, lambda cid: ingestor(cid, adopted=True))
        self.engine = RolloutEngine(fs, self.image, self.director, self.keys, broker=self.broker)

    def start(self) -> Controller:
        self.server.start()
        if self.ingest is not None:
            self.ingest.start()
        if self._lead():
            self.tick()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.adoptions is not None:
            self.adoptions.stop()
        if self.ingest is not None:
            self.ingest.stop()
        self.server.stop()
        if self.leadership is not None:
            self.leadership.release()
        if self.identity is not None:
            self.identity.release()
        if self.store is not None:
            self.store.close()

    @property
    def role(self) -> str:
        """This controller's part: "leader" (runs rollouts and re-signs) or "standby" (serves and ingests, waits for the lock)."""
        return "leader" if self.leadership is None or self.leadership.held() else "standby"

    def _lead(self) -> bool:
        """Whether this controller leads now: the lock taken (or kept), logged when that changes."""
        if self.leadership is None:
            return True
        was = self._leading
        self._leading = self.leadership.try_acquire()
        if self._leading and not was:
            self._next_refresh = 0.0  # a new leader checks the online metadata at once: the old one may have died late
            synced = self.director.sync()  # the director's roots into this ROOT; files signed without the store into it
            logs.event(log, "director.synced", pushed=synced.pushed, files_behind=synced.behind)
        if was and not self._leading and self.adoptions is not None:
            self.adoptions.stop()  # the next leader adopts them
        if self._leading != was:
            if not self.shared:
                self.server.accept(self._leading)
            logs.event(log, "leader.acquired" if self._leading else ("leader.lost" if was else "leader.standby"), pid=os.getpid())
        return self._leading

    def healthy(self) -> bool:
        """Every thread that does the controller's work runs: the repository server's (network and readers), the
        ingest's, the rollout loop. paho ends its network thread for good when a callback raises; a process that
        stays up serving nothing is worse than one that exits and is restarted."""
        ingest_ok = self.ingest is None or self.ingest.alive()
        return self.server.alive() and ingest_ok and self._thread.is_alive()

    def _loop(self) -> None:
        self._next_refresh = time.monotonic() + self.interval_s
        while not self._stop.wait(self.tick_s if self.engine is not None else self.interval_s):
            try:
                if not self._lead():
                    continue  # a standby: serving and ingest go on in their own threads
                if self.adoptions is not None and time.monotonic() >= self._next_adoption:
                    self._next_adoption = time.monotonic() + ADOPT_EVERY_S
                    self.adoptions.check()
                if self.engine is not None:
                    self.engine.tick()
                if time.monotonic() >= self._next_refresh:
                    self._next_refresh = time.monotonic() + self.interval_s
                    self._round()
            except Exception as exc:  # a failed round is logged and retried; the server keeps serving
                logs.event(log, "controller.round_failed", logging.ERROR, reason=f"{type(exc).__name__}: {exc}")

    def _round(self) -> None:
        """The leader's periodic round, each step on its own: one that fails (the image keys rotated on another
        host, say) is logged and retried next round and holds up none of the others."""
        steps: list[tuple[str, Callable[[], object]]] = [
            ("director_sync", self.director.sync),  # what `fleet assign` or a key rotation wrote without the store reaches it
            ("image_refresh", self._refresh_image),
            ("director_refresh", self._refresh_director),
        ]
        if self.store is not None:
            store = self.store
            steps.append(("telemetry_prune", lambda: store.prune_telemetry(self.telemetry_keep_s)))
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                logs.event(log, "controller.round_failed", logging.ERROR, step=name, reason=f"{type(exc).__name__}: {exc}")

    def tick(self) -> list[str]:
        """Re-sign what is past half its lifetime; announce every device whose director metadata changed."""
        self._refresh_image()
        return self._refresh_director()

    def _refresh_image(self) -> None:
        now = datetime.now(timezone.utc)
        if _expires_soon(self.image.timestamp(), self.image.expiry.timestamp.total_seconds(), now) or _expires_soon(
            self.image.snapshot(), self.image.expiry.snapshot.total_seconds(), now
        ):
            self.image.refresh(self.keys)
            logs.event(log, "controller.image_refreshed")

    def _refresh_director(self) -> list[str]:
        now = datetime.now(timezone.utc)
        lifetime = self.director.timestamp_expiry.total_seconds()
        timestamps = self.director.timestamps(self.director.devices())
        stale = [device for device, ts in timestamps.items() if _expires_soon(Metadata.from_bytes(ts), lifetime, now)]
        if stale:
            self.director.refresh(self.keys, stale)
            announce(self.director, stale, broker=self.broker)
            logs.event(log, "controller.director_refreshed", devices=len(stale))
        return stale
