"""Many paho MQTT connections on one asyncio loop, at the lowest cost per packet: the simulator's transport.

Why not aiomqtt (which the simulator used before): with one connection per simulated device, the load generator was
the largest user of the benchmark box's two cores (80 of the 134 CPU-seconds a 10,000-device rollout used, against 24
for the leading controller), and most of it was aiomqtt's per-client and per-packet machinery around paho: a
housekeeping task waking every client every second, a writer registered and removed on the loop for every publish, a
timeout timer and future for every acknowledgement, every message passed through a queue and an async iterator.

Here the codec stays paho's (the agent's own library, so a simulated device speaks exactly what an agent speaks) and
only what many connections need is added: ``ClientGroup`` owns the loop's side — one housekeeping pass over all its
clients every few seconds (keepalive pings, and dropping a connection whose acknowledgements stopped coming) — and
``LoopClient`` is one connection: a publish is written to the socket at once (a writer is registered only when the
socket's buffer is full), messages go straight to a callback, and an acknowledgement is a future only for a caller
that waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt import protocol_of, tcp_nodelay

__all__ = ["ClientGroup", "ConnectionLost", "LoopClient", "Will"]

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 5.0  # how often every client's keepalive is looked at (keepalives are 60 s: a ping is at most this late)


class ConnectionLost(Exception):
    """The connection could not be made, was refused, dropped, or stopped acknowledging: connect again elsewhere."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class ClientGroup:
    """The clients of one event loop and their one housekeeping task. Use as ``async with ClientGroup(...) as group``."""

    def __init__(self, mqtt_version: str = "5", tls: ssl.SSLContext | None = None, timeout_s: float = 30.0) -> None:
        self.mqtt_version, self.tls, self.timeout_s = mqtt_version, tls, timeout_s
        self.clients: set[LoopClient] = set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ClientGroup:
        self._task = asyncio.create_task(self._housekeeping())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)  # a period, not a wait for a condition
            now = time.monotonic()
            for client in list(self.clients):
                try:
                    client.housekeeping(now)
                except Exception as exc:  # one client's surprise must not stop every other client's pings
                    log.exception("housekeeping failed; the connection is given up")
                    client._closed(ConnectionLost(f"housekeeping: {exc}"))

    def client(
        self,
        client_id: str,
        on_message: Callable[[str, bytes], None],
        *,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        keepalive: int = 60,
        clean_session: bool | None = None,
    ) -> LoopClient:
        """A connection, not yet made (``await client.connect(host, port)``). ``clean_session``: MQTT 3.1.1 only."""
        return LoopClient(self, client_id, on_message, username, password, will, keepalive, clean_session)


class LoopClient:
    """One MQTT connection on the group's loop. Every wait ends in ``ConnectionLost`` when the connection goes."""

    def __init__(
        self,
        group: ClientGroup,
        client_id: str,
        on_message: Callable[[str, bytes], None],
        username: str | None,
        password: str | None,
        will: Will | None,
        keepalive: int,
        clean_session: bool | None,
    ) -> None:
        self.group, self.keepalive = group, keepalive
        v311 = group.mqtt_version == "3.1.1"
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol_of(group.mqtt_version),
            clean_session=clean_session if v311 else None,
        )
        if username is not None:
            c.username_pw_set(username, password)
        if group.tls is not None:
            c.tls_set_context(group.tls)
        if will is not None:
            c.will_set(will.topic, will.payload, will.qos, will.retain)
        c.suppress_exceptions = True  # a callback that raises is logged by paho, not left half-handled in its reader
        self.paho, self._on_message_cb = c, on_message
        self._loop = asyncio.get_running_loop()
        self._acks: dict[int, asyncio.Future[Any]] = {}  # mid -> a waiter (PUBACK, SUBACK, CONNACK as mid -1)
        self._sent_at: dict[int, float] = {}  # mid -> when an acknowledged publish went out: a broker that stops answering
        self._sock: Any = None
        self._writing = False
        self.lost = asyncio.Event()  # set once the connection is gone (an Event: a cancelled waiter must not cancel it)

    # ---- the connection
    async def connect(self, host: str, port: int) -> None:
        """Connect and wait for the broker's CONNACK; refused or unanswered within the group's timeout: ``ConnectionLost``.

        The TCP (and TLS) connect and the CONNECT packet's write run in a thread (an address that does not answer must
        not stop the loop) with no callback of ours installed: nothing on the loop is touched from that thread. A
        device cancelled meanwhile leaves the thread to finish; whatever socket it opened is closed then."""
        opening = self._loop.run_in_executor(None, self._open, host, port)
        try:
            await asyncio.wait({opening})  # not ``await opening``: a cancellation here must not orphan the thread's socket
        except asyncio.CancelledError:
            opening.add_done_callback(lambda _: self._abandon())
            raise
        error = opening.exception()
        if error is not None or self.paho.socket() is None:
            self._abandon()
            raise ConnectionLost(f"{host}:{port}: {error or 'the connection closed as it opened'}")
        c = self.paho
        c.on_connect, c.on_disconnect, c.on_subscribe = self._on_connect, self._on_disconnect, self._on_subscribe
        c.on_publish, c.on_socket_close = self._on_publish, self._on_socket_close
        c.on_message = lambda _c, _u, msg: self._on_message_cb(msg.topic, bytes(msg.payload))
        self._sock = c.socket()
        tcp_nodelay(None, None, self._sock)
        self._loop.add_reader(self._sock, self._readable)
        self.group.clients.add(self)
        self._flush()
        await self._wait(self._waiter(-1), "CONNACK")

    def _open(self, host: str, port: int) -> None:
        rc = self.paho.connect(host, port, keepalive=self.keepalive)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise OSError(mqtt.error_string(rc))

    def _abandon(self) -> None:
        """A connection that never became ours (failed, or its device cancelled while it opened): closed, no will."""
        sock = self.paho.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self.lost.set()

    async def disconnect(self) -> None:
        """A clean DISCONNECT (the broker does not publish the will) when the socket takes it; a DISCONNECT stuck behind
        unwritten bytes (a broker that stopped reading) is given up with the socket, and the broker publishes the will."""
        if not self.lost.is_set() and self._sock is not None:
            self.paho.disconnect()  # paho writes it, then closes its socket (``_on_socket_close``), when the buffer has room
        self._closed(ConnectionLost("disconnected"))

    # ---- requests
    async def subscribe(self, topics: list[tuple[str, int]]) -> list[Any]:
        """Subscribe; the broker's answer per filter (reason codes, or granted QoS for 3.1.1)."""
        rc, mid = self.paho.subscribe(topics)
        self._raise_unless_ok(rc)
        assert mid is not None  # paho gives a message id with every SUBSCRIBE it sent
        waiter = self._waiter(mid)
        self._flush()
        return list(await self._wait(waiter, "SUBACK"))

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Write the publish now; its message id for QoS 1."""
        if self.lost.is_set():
            raise ConnectionLost("not connected")
        info = self.paho.publish(topic, payload, qos, retain)
        self._raise_unless_ok(info.rc)
        if qos:
            self._sent_at[info.mid] = time.monotonic()
        self._flush()
        return info.mid

    async def publish_acknowledged(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait until the broker acknowledged it (QoS 1)."""
        await self.acknowledged(self.publish(topic, payload, qos, retain))

    async def acknowledged(self, mid: int) -> None:
        """Until the broker acknowledged the QoS 1 publish ``mid`` (at once if it already has). No timer per publish: a
        broker that stopped acknowledging is found by housekeeping, which ends the connection. Several may wait for one
        ``mid``; a waiter cancelled does not cancel the others."""
        if self.lost.is_set():
            raise ConnectionLost("not connected")
        if mid not in self._sent_at:
            return
        await asyncio.shield(self._waiter(mid))

    # ---- paho's callbacks and the loop's
    def _readable(self) -> None:
        rc = self.paho.loop_read()
        # TLS: packets already decrypted into the SSL object's buffer do not make the socket readable again
        while rc == mqtt.MQTT_ERR_SUCCESS and self._sock is not None and isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            rc = self.paho.loop_read()
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._closed(ConnectionLost(f"read: {mqtt.error_string(rc)}"))
        else:
            self._flush()  # answers paho queued while reading (PUBACKs of QoS 1 messages we received)

    def _writable(self) -> None:
        self.paho.loop_write()
        self._flush()

    def _flush(self) -> None:
        """paho writes a publish itself when it can; what the socket did not take is written when it is writable."""
        want = self._sock is not None and not self.lost.is_set() and self.paho.want_write()
        if want and not self._writing:
            self.paho.loop_write()
            want = self.paho.want_write()
        if want != self._writing and self._sock is not None:
            if want:
                self._loop.add_writer(self._sock, self._writable)
            else:
                self._loop.remove_writer(self._sock)
            self._writing = want

    def housekeeping(self, now: float) -> None:
        """Keepalive pings (paho's ``loop_misc``), and a connection whose oldest publish is unacknowledged after the
        group's timeout is shut: the read that follows finds it closed, as when the broker dropped it."""
        if self.lost.is_set():
            return
        if self._sent_at and now - min(self._sent_at.values()) > self.group.timeout_s:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            return
        if self.paho.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
            self._closed(ConnectionLost("keepalive"))
        self._flush()

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
        self._resolve(-1, None, ConnectionLost(f"refused: {reason}") if reason.is_failure else None)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        self._resolve(mid, reasons)

    def _on_publish(self, _c: Any, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        self._sent_at.pop(mid, None)
        self._resolve(mid, None)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self._closed(ConnectionLost(f"disconnected: {reason}"))

    def _on_socket_close(self, _c: Any, _u: Any, _sock: Any) -> None:
        self._forget_socket()

    # ---- bookkeeping
    def _closed(self, error: ConnectionLost) -> None:
        """The connection is gone (or given up: a socket still open is closed without a DISCONNECT, so the broker
        publishes the will, as for an agent whose keepalive failed): every waiter fails with ``error``."""
        sock = self._sock
        self._forget_socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.group.clients.discard(self)
        self.lost.set()
        waiters, self._acks = self._acks, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(error)
        self._sent_at.clear()

    def _forget_socket(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock)
            if self._writing:
                self._loop.remove_writer(self._sock)
            self._sock, self._writing = None, False

    def _waiter(self, mid: int) -> asyncio.Future[Any]:
        """The one future for ``mid``'s acknowledgement (made at the first wait)."""
        if self.lost.is_set():
            raise ConnectionLost("not connected")
        fut = self._acks.get(mid)
        if fut is None:
            fut = self._acks[mid] = self._loop.create_future()
        return fut

    def _resolve(self, mid: int, value: Any, error: Exception | None = None) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(value)

    async def _wait(self, waiter: asyncio.Future[Any], what: str) -> Any:
        try:
            return await asyncio.wait_for(waiter, self.group.timeout_s)
        except asyncio.TimeoutError:
            self._closed(ConnectionLost(f"no {what} in {self.group.timeout_s:.0f} s"))
            raise ConnectionLost(f"no {what} in {self.group.timeout_s:.0f} s") from None

    def _raise_unless_ok(self, rc: int) -> None:
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionLost(mqtt.error_string(rc))
