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
import time
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import InvalidOptions
from agent.settings import BrokerSettings

SUBSCRIBE_RETRIES = 5

__all__ = ["FailoverClient", "ReadAheadClient", "make_client", "protocol_of", "read_password", "tcp_nodelay", "tls_context"]


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
    and key when set. One place for every paho client (the agent's, the controller's, the simulator's), so each checks
    the broker the same way."""
    if broker.tls_ca is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(broker.tls_ca))
        if broker.tls_cert is not None:
            context.load_cert_chain(str(broker.tls_cert), str(broker.tls_key) if broker.tls_key else None)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidOptions(f"broker TLS files (tls_ca/tls_cert/tls_key): {exc}") from exc
    return context


class ReadAheadClient(mqtt.Client):
    """A paho client that reads the socket in large pieces and acknowledges many messages in one write.

    Why: stock paho reads every packet with four ``recv`` calls (type, length, rest) after one ``select``, and each
    manual acknowledgement wakes its loop through a socket pair and goes out in a send of its own: five to seven system
    calls per QoS 1 message, most of the cost of a small one. Here ``recv`` takes up to ``READ_AHEAD`` bytes at once
    and paho's parser is fed from that buffer; ``loop_read`` goes on until the buffer is empty (``select`` cannot see
    bytes already read), and ``ack_many`` queues one write of every PUBACK.
    """

    READ_AHEAD = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # True: ``on_message`` gets a payload as a memoryview into the packet read, not a copy (a bulk transfer's 256 KiB
        # chunks: the update fetcher), where ``_handle_publish`` decodes it (QoS 0 and 1 without properties; paho's own
        # decoding gives bytes). The view is the receiver's alone: paho reads the next packet into a new buffer.
        self.payload_views = False
        self._read_buffer = b""
        self._read_at = 0
        # One writer at a time: the loop's thread, or another sending directly (``_send_now``); held by ``reconnect`` too.
        # Reentrant: a client without a loop thread of its own writes from inside paho's calls that may hold it.
        self._write_lock = threading.RLock()

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._read_at >= len(self._read_buffer):
            data = super()._sock_recv(max(bufsize, self.READ_AHEAD))  # BlockingIOError when nothing came: paho's AGAIN
            if len(data) <= bufsize:
                return data  # b"" at the end of the stream, as paho expects
            self._read_buffer, self._read_at = data, 0
        start = self._read_at
        self._read_at = min(start + bufsize, len(self._read_buffer))
        return self._read_buffer[start : self._read_at]

    def _buffered(self) -> bool:
        return self._read_at < len(self._read_buffer)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None and self._buffered():
            rc = super().loop_read(1)  # each round consumes buffered bytes or ends at an empty socket
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None and self._out_packet:
            rc = self.loop_write()  # what the callbacks queued (acknowledgements, replies made inline), in one write, now
        return rc

    def _packet_queue(
        self, command: int, packet: bytes | bytearray, mid: int, qos: int, info: mqtt.MQTTMessageInfo | None = None
    ) -> MQTTErrorCode:
        """paho wakes its loop through a socket pair for every packet queued; the loop's own thread (a callback
        acknowledging or answering) needs no waking: ``loop_read`` writes what was queued once the reads are done.
        Beside a loop on its own thread (``loop_start``), another thread (a serving worker answering) sends a QoS 1 or 2
        PUBLISH itself when nothing is queued before it and no one is writing (``_send_now``): the loop is woken only
        for what that thread could not send."""
        thread = self._thread
        if thread is None:
            return super()._packet_queue(command, packet, mid, qos, info)
        if threading.get_ident() != thread.ident:
            if command & 0xF0 == mqtt.PUBLISH and qos and self._send_now((packet,), mid, qos, info):
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            self._out_packet.append(_out_packet(command, mid, qos, packet, info))
            self._wake_loop()  # (paho's own reads the socket pair twice: the loop's thread may set it to None between)
            self._call_socket_register_write()
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        wake, self._sockpairW = self._sockpairW, None  # another thread queuing meanwhile is written by this loop too
        try:
            return super()._packet_queue(command, packet, mid, qos, info)
        finally:
            self._sockpairW = wake

    def _send_now(self, parts: Sequence[bytes | bytearray], mid: int, qos: int, info: mqtt.MQTTMessageInfo | None) -> bool:
        """Send the packet made of ``parts`` (the whole packet, or a PUBLISH's header and payload) from this thread;
        False (nothing sent) where the loop must: TLS (one SSL connection must not be read and written by two threads
        at once) or websockets, packets already queued (their order), or the loop writing now. What the socket did not
        take is queued, and the loop woken to write it.

        Why: an answer made on a worker thread otherwise costs a wake of paho's loop, a switch to its thread and one
        round of its loop before it leaves; on a fast model that is a large part of a queued request's cost."""
        if self._ssl or self._transport != "tcp" or self._out_packet or not self.is_connected():
            return False  # (not connected: a reconnect is replacing the socket, and its CONNECT goes first)
        if not self._write_lock.acquire(blocking=False):
            return False
        try:
            sock = self._sock
            if self._out_packet or sock is None:  # queued by another thread after the first look; or no socket now
                return False
            try:
                sent = sock.send(parts[0]) if len(parts) == 1 else sock.sendmsg(parts)  # type: ignore[attr-defined]
            except (ValueError, OSError, AttributeError):  # it would block, or failed (or no sendmsg): the loop writes it
                return False
            with self._msgtime_mutex:
                self._last_msg_out = mqtt.time_func()
            if sent < sum(map(len, parts)) and self._sock is sock:  # (a socket closed meanwhile: paho sends it again)
                # First in the queue, before anything queued meanwhile: its first bytes are on the wire already
                self._out_packet.appendleft(_out_packet(mqtt.PUBLISH, mid, qos, _unsent(parts, sent), info))
        finally:
            self._write_lock.release()
        if self._out_packet:
            self._wake_loop()
        return True

    def _send_publish(
        self,
        mid: int,
        topic: bytes,
        payload: bytes | bytearray = b"",
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        info: mqtt.MQTTMessageInfo | None = None,
        properties: Properties | None = None,
    ) -> MQTTErrorCode:
        """A large QoS 1/2 PUBLISH that another thread may send itself (``_send_now``) goes out as its header and its
        payload in one ``sendmsg``, without paho's copy of the payload into a new packet: a 256 KiB chunk of the
        repository server's, once per chunk, on a thread holding the GIL. Anything else, or what cannot be sent now,
        is paho's (which copies, queues and tries the direct send again)."""
        thread = self._thread
        if (
            qos
            and not self._ssl
            and len(payload) >= GATHER_MIN_BYTES
            and thread is not None
            and threading.get_ident() != thread.ident
            and isinstance(topic, bytes)
            and isinstance(payload, (bytes, bytearray))
            and hasattr(self._sock, "sendmsg")
        ):
            header = self._publish_header(mid, topic, len(payload), qos, retain, dup, properties)
            if self._send_now((header, payload), mid, qos, info):
                self._easy_log(
                    mqtt.MQTT_LOG_DEBUG,
                    "Sending PUBLISH (d%d, q%d, r%d, m%d), '%s', ... (%d bytes)",
                    dup,
                    qos,
                    retain,
                    mid,
                    topic,
                    len(payload),
                )
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)

    def _publish_header(
        self, mid: int, topic: bytes, payload_length: int, qos: int, retain: bool, dup: bool, properties: Properties | None
    ) -> bytearray:
        """What paho's ``_send_publish`` writes before the payload of a QoS 1/2 PUBLISH, with paho's own helpers."""
        packed = (properties.pack() if properties is not None else b"\x00") if self._protocol == mqtt.MQTTv5 else b""
        header = bytearray([mqtt.PUBLISH | ((dup & 0x1) << 3) | (qos << 1) | retain])
        self._pack_remaining_length(header, 2 + len(topic) + 2 + len(packed) + payload_length)
        self._pack_str16(header, topic)
        header += mid.to_bytes(2, "big") + packed
        return header

    def _wake_loop(self) -> None:
        """One byte on the socket pair wakes the loop's ``select``. None while the loop's own thread queues (see above):
        that thread writes what is queued once it is done, so no wake is needed then."""
        wake = self._sockpairW
        if wake is not None:
            try:
                wake.send(b"0")
            except OSError:  # full (the loop has wakes to read already) or closed (it is stopping)
                pass

    def reconnect(self) -> MQTTErrorCode:
        """paho's, holding the write lock where there may be direct sends (a loop thread of its own): no thread sends
        directly, or queues the rest of a send, while paho replaces the socket and empties the queue. (A packet another
        thread queues in that moment is paho's own race, as in stock paho.) Without a loop thread no one sends directly,
        and the lock is not taken: a thread publishing there writes itself, holding paho's message lock, which
        ``reconnect`` takes too."""
        if self._thread is None:
            return super().reconnect()
        with self._write_lock:
            return super().reconnect()

    def _packet_write(self) -> MQTTErrorCode:
        """Small packets queued since the last write go out in one ``send`` where paho has nothing to do after writing
        them (all but QoS 0 PUBLISH, whose callback fires once written, and DISCONNECT). Large ones go alone: paho
        copies what is left of a packet at every partial send, so a merged 2 MB write of 256 KiB chunks cost the
        repository server a fifth of its throughput. One writer at a time where another thread may send directly
        (``_send_now``: only beside a loop thread of its own)."""
        if self._thread is None:
            return self._write_queued()
        with self._write_lock:
            return self._write_queued()

    def _write_queued(self) -> MQTTErrorCode:
        out = self._out_packet
        if len(out) > 1 and _mergeable(out[0]) and _mergeable(out[1]):
            merged, size = [out.popleft()], 0
            while out and _mergeable(out[0]) and size < MERGE_MAX_BYTES:
                size += out[0]["to_process"]
                merged.append(out.popleft())
            data = b"".join(bytes(m["packet"][m["pos"] :]) for m in merged)
            out.appendleft(_out_packet(_PUBACK_TYPE, 0, 0, data, None))
        return super()._packet_write()

    def _handle_publish(self) -> MQTTErrorCode:
        """QoS 0 and 1 messages that carry no MQTT 5 properties — what devices send — decoded here; anything else by
        paho. paho builds and clears a ``Properties`` object of 27 names for every MQTT 5 message (about 20 µs, more
        than the rest of the decoding); an empty one is copied from a template here."""
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        qos, v5 = (header & 0x06) >> 1, self._protocol == mqtt.MQTTv5
        topic_end = 2 + int.from_bytes(packet[:2], "big")
        body = topic_end + (2 if qos else 0) + v5  # the payload's first byte
        if qos > 1 or topic_end == 2 or len(packet) < body or (v5 and packet[body - 1] != 0):
            return super()._handle_publish()  # QoS 2 (or 3: bad), an empty topic (an alias), properties, malformed: paho's way
        message = mqtt.MQTTMessage(
            mid=int.from_bytes(packet[topic_end : topic_end + 2], "big") if qos else 0, topic=bytes(packet[2:topic_end])
        )
        message.dup, message.qos, message.retain = bool(header & 0x08), qos, bool(header & 0x01)
        message.properties = _no_properties() if v5 else None
        # A read-only view: the fetcher hashes it on arrival and writes it later, so nothing may write through it.
        message.payload = memoryview(packet)[body:].toreadonly() if self.payload_views else packet[body:]  # type: ignore[assignment]
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(message.mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        """``on_message`` straight away when no per-topic callback is registered (none of ours is). paho matches every
        message's topic against its per-topic callbacks first — a split, a generator and a trie walk in Python, under a
        lock — which took a seventh of the ingest's network thread in a py-spy profile (benchmarks/rollout.py)."""
        if self._on_message_filtered._root._children:
            super()._handle_on_message(message)
            return
        on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:  # as paho does: logged, raised again unless suppress_exceptions
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        """A plain PUBACK (the message id alone: success, no properties) without paho's new ``ReasonCode`` and
        ``Properties`` for each (about 30 µs); a PUBACK with a reason or properties, and PUBCOMP, by paho."""
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet, "big")
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _no_properties(_EMPTY_PUBACK_PROPERTIES))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_close(self) -> None:
        self._read_buffer, self._read_at = b"", 0  # a new connection starts with nothing of the old one
        super()._sock_close()

    def ack_many(self, acks: Sequence[tuple[int, int]]) -> MQTTErrorCode:
        """Acknowledge messages taken with manual acknowledgement: every QoS 1 PUBACK in one queued write (a PUBACK with
        no reason code means success in MQTT 5 as in 3.1.1); QoS 2 through paho's own ``ack``; QoS 0 needs none."""
        pubacks = b"".join(_PUBACK + mid.to_bytes(2, "big") for mid, qos in acks if qos == 1)
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        if pubacks and self._manual_ack:
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_queue(_PUBACK_TYPE, pubacks, 0, 0)
        for mid, qos in acks:
            if qos == 2:
                rc = self.ack(mid, qos)
        return rc


_EMPTY_PUBLISH_PROPERTIES = Properties(PacketTypes.PUBLISH)
_EMPTY_PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)  # read only by callbacks: one for every plain PUBACK


def _no_properties(template: Properties = _EMPTY_PUBLISH_PROPERTIES) -> Properties:
    """A new empty ``Properties`` like ``template`` (its tables are paho's read-only ones, shared with the template)."""
    empty = Properties.__new__(Properties)
    empty.__dict__.update(template.__dict__)
    return empty


MERGE_MAX_BYTES = 16384  # packets merged into one send: acknowledgements, requests, small replies
GATHER_MIN_BYTES = 65536  # a PUBLISH payload from this size on is sent beside its header, not copied into one packet


def _unsent(parts: Sequence[bytes | bytearray], sent: int) -> bytes | memoryview:
    """What is left of ``parts`` after their first ``sent`` bytes went out, for the queue: a view of the payload where
    only it is left and it is ``bytes`` (immutable); a copy of a ``bytearray``'s rest (the caller may change or resize
    its buffer once ``publish`` returned, as it may with stock paho, which copies at once); the rest joined where more
    than one part is left (a header cut short: rare, and the copy paho would have made)."""
    for i, part in enumerate(parts):
        if sent < len(part):
            if i == len(parts) - 1 and isinstance(part, bytes):
                return memoryview(part)[sent:] if sent else part
            return b"".join([memoryview(part)[sent:], *parts[i + 1 :]])
        sent -= len(part)
    return b""


def _out_packet(command: int, mid: int, qos: int, packet: bytes | bytearray | memoryview, info: Any, pos: int = 0) -> Any:
    """A packet for paho's write queue (its ``_OutPacket``), ``pos`` bytes of it already sent."""
    return {"command": command, "mid": mid, "qos": qos, "pos": pos, "to_process": len(packet) - pos, "packet": packet, "info": info}


def _mergeable(packet: Any) -> bool:
    """A small queued packet paho does nothing with once it is written."""
    command = packet["command"] & 0xF0
    silent = not (command == mqtt.PUBLISH and packet["qos"] == 0) and command != mqtt.DISCONNECT
    return silent and packet["to_process"] <= MERGE_MAX_BYTES


_PUBACK_TYPE = 0x40
_PUBACK = bytes([_PUBACK_TYPE, 2])  # fixed header: PUBACK, remaining length 2 (the message id)


class FailoverClient(ReadAheadClient):
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
