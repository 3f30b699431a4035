"""The controller's one way to reach the broker: every MQTT client in ``fleet/`` comes from here, settings passed in.

Why one place: the controller must run on the secured broker (TLS with the fleet CA, its own user name and password,
the generated ACL; DESIGN.md). A client made anywhere else is the one that still tries plain TCP, or the wrong MQTT
version. paho clients come from ``agent.mqtt.make_client``, the agent's own factory, so the controller and the devices
check the broker and read their password file the same way; the simulator's aiomqtt clients get the same TLS context
and credentials from ``aiomqtt_options``. The settings travel as arguments (``BrokerSettings``), never through the
environment.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt

from agent.mqtt import make_client, read_password, tls_context
from agent.settings import BrokerSettings

__all__ = ["aiomqtt_options", "broker_settings", "client", "connect"]


def broker_settings(host: str | None = None, port: int | None = None, broker: BrokerSettings | None = None) -> BrokerSettings:
    """``broker`` (default: plain TCP to 127.0.0.1:1883, MQTT 5) with its address replaced by ``host``/``port`` when given.

    The Python form of ``--broker HOST:PORT`` overriding ``fleet.toml``: the address changes, TLS, credentials and the
    MQTT version stay. Empty values (``""``, ``0``) count as not given.
    """
    base = broker if broker is not None else BrokerSettings()
    update: dict[str, Any] = {}
    if host:
        update["host"] = host
    if port:
        update["port"] = port
    return base.model_copy(update=update) if update else base


def client(broker: BrokerSettings, client_id: str) -> mqtt.Client:
    """A paho client for ``broker`` (version, TCP_NODELAY, credentials, TLS); not connected yet (callbacks first)."""
    return make_client(broker, client_id)


def connect(c: mqtt.Client, broker: BrokerSettings) -> None:
    """Connect ``c`` (made by ``client``) to ``broker``'s address with its keepalive."""
    c.connect(broker.host, broker.port, keepalive=broker.keepalive_s)


def aiomqtt_options(broker: BrokerSettings, username: str | None = None, password: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``aiomqtt.Client``: address, MQTT version, TLS and credentials from ``broker``.

    ``username``/``password`` replace the settings' own (a simulated device logs in as itself, with the password
    ``fleet provision`` issued for it, so the generated ACL confines it as it confines a real device).
    """
    import aiomqtt

    name = username if username is not None else broker.username
    secret = password if username is not None else (read_password(broker) if broker.username else None)
    return {
        "hostname": broker.host,
        "port": broker.port,
        "protocol": aiomqtt.ProtocolVersion.V311 if broker.mqtt_version == "3.1.1" else aiomqtt.ProtocolVersion.V5,
        "tls_context": tls_context(broker),
        "username": name,
        "password": secret,
    }
