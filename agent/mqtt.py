"""One way to make MQTT clients, the agent's and the controller's (``fleet.transport.client``): MQTT 5, TCP_NODELAY, credentials,
TLS and the broker's addresses from ``BrokerSettings``.

Why failover lives in the client: paho reconnects on its own, but only ever to the one address it was given. A clustered
broker has several; a ``FailoverClient`` knows them all, so every paho client made here — the agent's session, its update
fetcher and commands, the controller's ingest, repository server and announcements — moves to the next node when its node
drops or refuses it, with no code of its own.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties

from agent.errors import InvalidOptions
from agent.settings import BrokerSettings

SUBSCRIBE_RETRIES = 5

__all__ = ["FailoverClient", "make_client", "protocol_of", "read_password", "tcp_nodelay", "tls_context"]


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


class FailoverClient(mqtt.Client):
    """A paho client that knows every address of the broker: ``connect`` tries them in order until one answers, and
    each reconnect paho makes (after a drop or a refusal) goes to the next one, round the list.

    The will, the session and every callback belong to the client, not to the address, so they carry over unchanged:
    a node of the cluster that takes the client over sees the same will and (persistent session) the same session.
    """

    def __init__(self, addresses: Sequence[tuple[str, int]], *args: Any, first: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not addresses:
            raise InvalidOptions("broker: no address to connect to")
        self.addresses = list(addresses)
        self._next = first % len(self.addresses)  # the address of the next connection attempt
        self.on_pre_connect = self._take_next_address
        self._owner_on_subscribe: Any = None
        self._subs_lock = threading.Lock()
        self._asked: dict[int, tuple[list[Any], Properties | None]] = {}  # SUBSCRIBE message id -> what it asked for
        self._sub_failures: dict[str, int] = {}  # topic filter -> failed SUBACKs in a row

    # -- subscriptions the broker failed to set up ----------------------------------------------
    # A node that just lost a peer may answer SUBSCRIBE with a failure and keep the connection (NATS, while JetStream
    # elects new leaders: "Unable to add JetStream consumer"): the client would stay connected and deaf. So a failed
    # subscription is asked for again, after 1, 2, 4, 8, 16 s; then the failure goes to the owner's ``on_subscribe``.

    @property  # type: ignore[override]
    def on_subscribe(self) -> Any:
        return self._checked_suback  # what paho calls on every SUBACK

    @on_subscribe.setter
    def on_subscribe(self, func: Any) -> None:
        self._owner_on_subscribe = func

    def subscribe(
        self, topic: Any, qos: int = 0, options: Any = None, properties: Properties | None = None
    ) -> tuple[MQTTErrorCode, int | None]:
        result = super().subscribe(topic, qos, options, properties)
        if result[1] is not None:
            items = list(topic) if isinstance(topic, list) else [topic if isinstance(topic, tuple) else (topic, options or qos)]
            with self._subs_lock:
                self._asked[result[1]] = (items, properties)
        return result

    def _checked_suback(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any], properties: Any) -> None:
        with self._subs_lock:
            items, props = self._asked.pop(mid, ([], None))
            failed = [item for item, reason in zip(items, reasons) if getattr(reason, "is_failure", False)]
            for item, reason in zip(items, reasons):
                if not getattr(reason, "is_failure", False):
                    self._sub_failures.pop(str(item[0]), None)
            tries = max((self._sub_failures.get(str(item[0]), 0) for item in failed), default=0)
            if failed and tries < SUBSCRIBE_RETRIES:
                for item in failed:
                    self._sub_failures[str(item[0])] = tries + 1
        if failed and tries < SUBSCRIBE_RETRIES:
            retry = threading.Timer(2.0**tries, self._subscribe_again, (failed, props))
            retry.daemon = True
            retry.start()
            return
        if self._owner_on_subscribe is not None:
            self._owner_on_subscribe(client, userdata, mid, reasons, properties)

    def _subscribe_again(self, items: list[Any], properties: Properties | None) -> None:
        if self.is_connected():  # else the owner's on_connect subscribes anew
            self.subscribe(items, properties=properties)

    @property
    def address(self) -> str:
        """The address of the current (or last tried) connection, for logs."""
        return f"{self.host}:{self.port}"

    def _take_next_address(self, client: mqtt.Client, userdata: Any) -> None:
        """paho's ``on_pre_connect``: runs before every connection attempt, the old socket closed and the new one not
        made yet. paho's ``host``/``port`` setters refuse here (its state already reads "connecting"), so the attributes
        they would set are set directly: the next socket goes to this address (TLS checks this host name)."""
        self._host, self._port = self.addresses[self._next]
        self._next = (self._next + 1) % len(self.addresses)

    def connect_async(
        self,
        host: str,
        port: int = 1883,
        keepalive: int = 60,
        bind_address: str = "",
        bind_port: int = 0,
        clean_start: mqtt.CleanStartOption = mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        properties: Properties | None = None,
    ) -> None:
        """As paho's. ``host:port`` one of the addresses: attempts go on from there; any other: it becomes the only one."""
        if (host, port) not in self.addresses:
            self.addresses = [(host, port)]
        self._next = self.addresses.index((host, port))
        super().connect_async(host, port, keepalive, bind_address, bind_port, clean_start, properties)

    def connect(
        self,
        host: str,
        port: int = 1883,
        keepalive: int = 60,
        bind_address: str = "",
        bind_port: int = 0,
        clean_start: mqtt.CleanStartOption = mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        properties: Properties | None = None,
    ) -> MQTTErrorCode:
        """Connect to ``host:port``, and when that fails (refused, unreachable, timed out) to each other address in turn.
        None answering: the one address's own error, or for several a ``ConnectionRefusedError`` naming each."""
        tried: list[str] = []
        for attempt in range(len(self.addresses) if (host, port) in self.addresses else 1):
            if attempt:
                host, port = self.addresses[self._next]
            try:
                return super().connect(host, port, keepalive, bind_address, bind_port, clean_start, properties)
            except OSError as exc:
                tried.append(f"{host}:{port}: {exc}")
                last = exc
        if len(tried) == 1:
            raise last
        raise ConnectionRefusedError(f"no broker address answered ({'; '.join(tried)})") from last


def make_client(broker: BrokerSettings, client_id: str, persistent: bool = False, first: int = 0) -> FailoverClient:
    """``persistent``: keep the session across reconnects (for 3.1.1 that is chosen here, for 5 at connect). ``first``:
    the index of the broker address to try first (the simulator spreads its devices over a cluster's nodes)."""
    v311 = broker.mqtt_version == "3.1.1"
    client = FailoverClient(
        broker.addresses(),
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol_of(broker.mqtt_version),
        clean_session=(not persistent) if v311 else None,
        first=first,
    )
    client.on_socket_open = tcp_nodelay
    if broker.username:
        client.username_pw_set(broker.username, read_password(broker))
    context = tls_context(broker)
    if context is not None:
        client.tls_set_context(context)
    return client
