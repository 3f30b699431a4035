"""One way to make MQTT clients, the agent's and the controller's (``fleet.transport.client``): MQTT 5, TCP_NODELAY, credentials and
TLS from ``BrokerSettings``."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt

from agent.errors import InvalidOptions
from agent.settings import BrokerSettings

__all__ = ["make_client", "protocol_of", "read_password", "tcp_nodelay", "tls_context"]


def tcp_nodelay(client: Any, userdata: Any, sock: Any) -> None:
    """paho ``on_socket_open``: Nagle adds 44-88 ms per request/reply round trip (DESIGN.md), so turn it off."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (websockets, unix): nothing to do
        pass


def protocol_of(version: str) -> mqtt.MQTTProtocolVersion:
    return mqtt.MQTTv311 if version == "3.1.1" else mqtt.MQTTv5


def read_password(broker: BrokerSettings) -> str | None:
    """The password from ``broker.password_file`` (kept out of the TOML so the settings can be shown and shared)."""
    if broker.password_file is None:
        return None
    try:
        return broker.password_file.read_text().strip()
    except OSError as exc:
        raise InvalidOptions(f"broker.password_file={str(broker.password_file)!r}: {exc.strerror}") from exc


def tls_context(broker: BrokerSettings) -> ssl.SSLContext | None:
    """TLS when ``broker.tls_ca`` is set: the fleet CA verifies the broker (and its host name); a client certificate
    and key when set. One place for paho and aiomqtt (the simulator), so every client checks the broker the same way."""
    if broker.tls_ca is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(broker.tls_ca))
        if broker.tls_cert is not None:
            context.load_cert_chain(str(broker.tls_cert), str(broker.tls_key) if broker.tls_key else None)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidOptions(f"broker TLS files (tls_ca/tls_cert/tls_key): {exc}") from exc
    return context


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
        client.username_pw_set(broker.username, read_password(broker))
    context = tls_context(broker)
    if context is not None:
        client.tls_set_context(context)
    return client
