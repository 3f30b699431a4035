"""One way to make the agent's MQTT clients: MQTT 5, TCP_NODELAY, credentials and TLS from the settings."""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt

from agent.errors import InvalidOptions
from agent.protocol import tcp_nodelay
from agent.settings import BrokerSettings

__all__ = ["make_client"]


def make_client(broker: BrokerSettings, client_id: str, protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
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
