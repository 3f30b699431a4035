"""One way to make the agent's MQTT clients: MQTT 5, TCP_NODELAY, credentials and TLS from the settings."""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt

from agent.errors import InvalidOptions
from agent.settings import BrokerSettings

__all__ = ["default_protocol", "make_client", "protocol_of", "tcp_nodelay"]


def tcp_nodelay(client: Any, userdata: Any, sock: Any) -> None:
    """paho ``on_socket_open``: Nagle adds 44-88 ms per request/reply round trip (DESIGN.md), so turn it off."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (websockets, unix): nothing to do
        pass


def protocol_of(version: str) -> mqtt.MQTTProtocolVersion:
    return mqtt.MQTTv311 if version == "3.1.1" else mqtt.MQTTv5


def default_protocol() -> mqtt.MQTTProtocolVersion:
    """The controller side's MQTT version: ``EDGEFLEET_BROKER__MQTT_VERSION`` (the agents' setting), else 5."""
    return protocol_of(os.environ.get("EDGEFLEET_BROKER__MQTT_VERSION", "5"))


def make_client(broker: BrokerSettings, client_id: str, persistent: bool = False) -> mqtt.Client:
    """``persistent``: keep the session across reconnects (for 3.1.1 that is chosen here, for 5 at connect)."""
    v311 = broker.mqtt_version == "3.1.1"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol_of(broker.mqtt_version),
        clean_session=(not persistent) if v311 else None,
    )
    client.on_socket_open = tcp_nodelay
    if broker.username:
        password = None
        if broker.password_file is not None:
            try:
                password = broker.password_file.read_text().strip()
            except OSError as exc:
                raise InvalidOptions(f"broker.password_file={str(broker.password_file)!r}: {exc.strerror}") from exc
        client.username_pw_set(broker.username, password)
    if broker.tls_ca is not None:
        try:
            context = ssl.create_default_context(cafile=str(broker.tls_ca))
            if broker.tls_cert is not None:
                context.load_cert_chain(str(broker.tls_cert), str(broker.tls_key) if broker.tls_key else None)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidOptions(f"broker TLS files (tls_ca/tls_cert/tls_key): {exc}") from exc
        client.tls_set_context(context)
    return client
