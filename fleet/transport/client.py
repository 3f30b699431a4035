"""The controller's one way to reach the broker: every MQTT client in ``fleet/`` comes from here, settings passed in.

Why one place: the controller must run on the secured broker (TLS with the fleet CA, its own user name and password,
the generated ACL; DESIGN.md). A client made anywhere else is the one that still tries plain TCP, or the wrong MQTT
version. paho clients come from ``agent.mqtt.make_client``, the agent's own factory, so the controller and the devices
check the broker and read their password file the same way (the simulator's clients, ``fleet.dev.loop_clients``, take
the same TLS context and password). The settings travel as arguments (``BrokerSettings``), never through the
environment. A clustered broker's addresses (``hosts``) travel with them: paho clients fail over by themselves
(``agent.mqtt.FailoverClient``); the simulator rotates through ``BrokerSettings.addresses()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt import FailoverClient, make_client
from agent.settings import BrokerSettings, parse_address

__all__ = ["QUEUED_SESSION_S", "RECONNECT_MAX_S", "broker_settings", "client", "connect"]

QUEUED_SESSION_S = 3600  # MQTT 5: how long the broker keeps a persistent controller session's messages after it left
RECONNECT_MAX_S = 10  # paho's default backoff grows to 120 s: a controller back a minute late stalls every rollout


def broker_settings(
    host: str | None = None, port: int | None = None, broker: BrokerSettings | None = None, hosts: Sequence[str] = ()
) -> BrokerSettings:
    """``broker`` (default: plain TCP to 127.0.0.1:1883, MQTT 5) with its address replaced by ``host``/``port``, or its
    addresses by ``hosts`` (``HOST:PORT`` each), when given.

    The Python form of ``--broker HOST:PORT[,HOST:PORT...]`` overriding ``fleet.toml``: the addresses change, TLS,
    credentials and the MQTT version stay. Empty values (``""``, ``0``, ``()``) count as not given.
    """
    base = broker if broker is not None else BrokerSettings()
    update: dict[str, Any] = {}
    if hosts:
        first = parse_address(hosts[0])
        update.update(hosts=list(hosts), host=first[0], port=first[1])
    elif host:
        update.update(host=host, hosts=[])
    if port and not hosts:
        update["port"] = port
    return base.model_copy(update=update) if update else base


def client(broker: BrokerSettings, client_id: str, persistent: bool = False) -> FailoverClient:
    """A paho client for ``broker`` (version, TCP_NODELAY, credentials, TLS, every address); not connected yet (callbacks
    first). ``persistent``: the broker queues the client's QoS 1 messages while it is away (failing over to another
    node of a cluster): ingest must not lose what devices published in that second; connect with ``connect``."""
    c = make_client(broker, client_id, persistent=persistent)
    c.reconnect_delay_set(1, RECONNECT_MAX_S)
    return c


def connect(c: mqtt.Client, broker: BrokerSettings, persistent: bool = False, resume: bool = False) -> None:
    """Connect ``c`` (made by ``client``) to ``broker``'s first address that answers, with its keepalive. ``persistent``
    (MQTT 5): a session kept ``QUEUED_SESSION_S`` across the reconnects that follow and after the client left; fresh at
    this first connection unless ``resume`` (a stable client id taking up what the broker kept for it)."""
    properties = None
    if persistent and broker.mqtt_version == "5":
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = QUEUED_SESSION_S
    # 3.1.1 has no clean start: a persistent client there always resumes (clean_session=False, ``client``)
    clean = False if persistent and resume and broker.mqtt_version == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY
    c.connect(broker.host, broker.port, keepalive=broker.keepalive_s, clean_start=clean, properties=properties)
