"""The agent's MQTT session: one paho client, its presence, its subscriptions and the one path every publish takes.

Why one place: the will (``lost``), the retained ``ready``/``disconnected`` status and the session
number they carry must agree (a late will of this run's earlier connection is answered with ``ready``
again: the session reads its own status), subscriptions must be renewed on every reconnect, and paho is not
safe to publish from many threads at once — serving, telemetry, the worker and paho's own thread
all publish, so they all go through ``publish_raw`` and its lock.

paho's network thread only routes here: a message goes to the handler of its topic kind, and
nothing a handler raises may escape (paho would re-raise and its thread would die for good, which
``network_alive`` reports to the watchdog).

A device with a broker of its own for inference (``[serving.broker]``) has a second session, ``presence=False``: its
own client id (``{id}-serving``), only the ``infer`` route, no will and no status — presence, commands, updates and
telemetry stay on the fleet's session, and each connection reconnects (and fails over) by itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import logs, wire
from agent.mqtt import FailoverClient, make_client
from agent.settings import BrokerSettings
from agent.wire import device_topic

__all__ = ["SESSION_EXPIRY_S", "Handler", "Route", "Session"]

log = logging.getLogger("edgefleet.agent")

SESSION_EXPIRY_S = 24 * 3600  # commands queued while the device is offline survive a day

Handler = Callable[[tuple[str, ...], bytes, int], None]  # (the topic past its kind, payload, QoS), on paho's thread


@dataclass(frozen=True)
class Route:
    """One subscription: ``dev/{id}/{kind}`` (or ``dev/{id}/{kind}/#`` when ``wildcard``) and who handles it."""

    kind: str
    handle: Handler
    wildcard: bool = False

    def topic(self, device_id: str) -> str:
        return device_topic(device_id, self.kind, "#") if self.wildcard else device_topic(device_id, self.kind)


class Session:
    """Connect (persistent session, will = ``lost``), subscribe on every connect, say ``ready``, route messages, publish.

    ``number`` is this run's session counter: status and will name it, so the controller tells a stale ``lost``
    from the current run. ``on_connected`` runs on paho's thread after ``ready`` went out (and must not raise).
    ``presence`` False (a serving-only session on a device-local broker): no will, no ``ready``/``disconnected``;
    ``client_id`` (default: the device id) must then differ from the fleet session's, or the two would take each other's place.
    """

    def __init__(
        self,
        broker: BrokerSettings,
        device_id: str,
        number: int,
        routes: Sequence[Route],
        on_connected: Callable[[], None],
        client_id: str | None = None,
        presence: bool = True,
    ) -> None:
        self.broker, self.device_id, self.number = broker, device_id, number
        self.client_id, self.presence = client_id or device_id, presence
        self.routes = {r.kind: r for r in routes}
        self._status_topic = device_topic(device_id, "status")
        # Our own status (presence only): a late will of an earlier connection is answered with ``ready`` again.
        # Subscribed to once the broker took this connection's ``ready``, never with it: a nats-server cluster that got
        # the subscription to a topic and a retained publish on it together lost the retained message for other
        # subscribers (measured: at the first connection of 100 simulated devices, one device's ``ready`` reached
        # neither the controller nor one node's retained store in 2 trials of 3). Never with MQTT 5's no-local: a real
        # will carries our client id, and the broker would drop it.
        self._own_status = Route("status", self._on_own_status) if presence else None
        self._ready_mid: int | None = None  # this connection's ``ready``: its PUBACK subscribes to our own status
        self._status_sub_mid: int | None = None  # that subscription's SUBACK is not the one ``wait_connected`` waits for
        self.on_connected = on_connected
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # the broker answered this connection's subscriptions
        self._closing = threading.Event()
        self._client = self._make_client()

    def _make_client(self) -> FailoverClient:
        c = make_client(self.broker, self.client_id, persistent=True)
        if self.presence:
            c.will_set(device_topic(self.device_id, "status"), wire.encode(self.status("lost")), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.reconnect_delay_set(1, 30)  # exponential backoff between reconnects, 1 s to 30 s
        return c

    def status(self, state: str) -> wire.Status:
        return wire.Status(state=state, session=self.number, ts=time.time())  # type: ignore[arg-type]

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Session:
        """Connect in the background and keep the session a day. paho retries until the broker is there, each attempt
        at the broker's next address (``hosts``): a node that drops or refuses the agent hands it to the next node."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        b = self.broker
        self._client.connect_async(b.host, b.port, keepalive=b.keepalive_s, clean_start=False, properties=props)
        self._client.loop_start()
        return self

    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Connected and subscribed: a request published after this is delivered to us (one published between the
        CONNACK and the SUBACK may reach the broker before our subscription does, and goes to nobody)."""
        return self._subscribed.wait(timeout)

    def begin_close(self, unsubscribe: Sequence[str] = ()) -> None:
        """The agent is stopping: a disconnect from now on is expected (not logged as a warning), and the kinds named
        are taken no more (inference requests first, so the broker stops handing over work that would go unanswered)."""
        self._closing.set()
        if self._connected.is_set():
            for kind in unsubscribe:
                self._client.unsubscribe(self.routes[kind].topic(self.device_id))

    def close(self) -> None:
        """Say ``disconnected`` (retained; the will only fires on an unclean drop), then leave."""
        info = None
        with self._lock:  # one step with the flag: a late will answered at this moment says ``ready`` before this, not after
            self._closing.set()
            if self._connected.is_set() and self.presence:
                info = self._client.publish(self._status_topic, wire.encode(self.status("disconnected")), qos=1, retain=True)
        if info is not None:
            info.wait_for_publish(timeout=2)
        self._client.disconnect()
        self._client.loop_stop()

    def network_alive(self) -> bool:
        """paho's network thread runs: if a callback ever raised, paho re-raised and that thread is gone for good,
        leaving a process that serves nothing; the watchdog then stops pinging and systemd restarts the agent."""
        thread = getattr(self._client, "_thread", None)
        return thread is not None and thread.is_alive()

    # -- publishing ----------------------------------------------------------------

    def publish(self, what: str, message: wire.WireModel, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """A wire message on ``dev/{id}/{what}`` at QoS 1."""
        return self.publish_raw(device_topic(self.device_id, *what.split("/")), wire.encode(message), 1, retain)

    def publish_raw(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        with self._lock:
            return self._client.publish(topic, payload, qos=qos, retain=retain)

    # -- paho's thread -------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            logs.event(log, "agent.connect_refused", logging.ERROR, reason=str(reason))
            return
        client.subscribe([(r.topic(self.device_id), 1) for r in self.routes.values()])
        self._connected.set()
        if self.presence:
            # Only while a ``ready`` waits for its PUBACK: paho calls on_publish for every PUBACK, a served reply's too.
            client.on_publish = self._on_publish
            self._ready_mid = self.publish("status", self.status("ready"), retain=True).mid
        self.on_connected()
        logs.event(log, "agent.connected", broker=self._client.address, client=self.client_id)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        """The routes' subscribe of this connection was answered (``FailoverClient`` calls this after its retries of
        refused topics); the own status's, asked for after ``ready``, is not what ``wait_connected`` waits for."""
        if mid != self._status_sub_mid:
            self._subscribed.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        """The broker took this connection's ``ready``: now subscribe to our own status (see ``__init__``). On a
        connection that found its session, the broker already holds that subscription; asking again changes nothing."""
        if mid != self._ready_mid or self._own_status is None:
            return
        self._ready_mid = None
        client.on_publish = None  # the replies' PUBACKs from now on call nothing (0.3 µs each, more with cold caches)
        if getattr(reason, "is_failure", False):  # MQTT 5: refused (an ACL): the status is not ours to watch either
            logs.event(log, "agent.ready_refused", logging.ERROR, reason=str(reason))
            return
        self._status_sub_mid = client.subscribe([(self._own_status.topic(self.device_id), 1)])[1]

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if not self._closing.is_set():
            logs.event(log, "agent.disconnected", logging.WARNING, broker=self._client.address, client=self.client_id, reason=str(reason))

    def _on_own_status(self, rest: tuple[str, ...], payload: bytes, qos: int) -> None:
        """Our retained status says this run is gone while we are connected: the will of an earlier connection of this
        run, landed after this connection's ``ready``. On a broker cluster the will and the ``ready`` are stored by
        different nodes, and the registry can get them in that order (seen once in CI on NATS with a node killed: the
        device stayed offline in the registry and a rollout never assigned it). The will reaches us too (our
        subscription is persistent), and the ``ready`` said again is published after we read it: a broker that keeps
        one topic's messages in the order it stored them then hands the registry the two in that order (NATS stores
        both in one JetStream stream; other clusters are not tested). (The retained ``lost`` a reconnect after an
        unclean drop replays is answered the same way: one status more, harmless.)"""
        try:
            status = wire.decode(wire.Status, payload)
        except wire.WireError:
            return  # not ours to judge: the registry refuses and counts it
        if not status.denies(self.number):
            return
        with self._lock:  # the check and the publish in one step with ``close``: never a ``ready`` after ``disconnected``
            if not self._connected.is_set() or self._closing.is_set():
                return
            self._client.publish(self._status_topic, wire.encode(self.status("ready")), qos=1, retain=True)
        logs.event(log, "agent.presence_restored", session=status.session, broker=self._client.address)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Route by topic, decode nothing here. Nothing may raise (paho re-raises and its thread dies)."""
        try:
            topic = wire.parse_device_topic(msg.topic)
            route = self.routes.get(topic.kind) or (self._own_status if topic.kind == "status" else None)
            if topic.device == self.device_id and route is not None:
                route.handle(topic.rest, bytes(msg.payload), msg.qos)
        except Exception as exc:  # a bug costs one message, never the MQTT thread
            logs.event(log, "agent.message_failed", logging.ERROR, topic=msg.topic[:120], reason=f"{type(exc).__name__}: {exc}"[:300])
