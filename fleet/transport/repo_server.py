"""Serve a repository directory (TUF metadata and targets) to devices over MQTT.

Devices pull: each request names a path, an offset and a length (at most 256 KiB),
and the reply goes to the device's own reply topic. Nothing is ever pushed into a
device's queue, so mosquitto's ``max_queued_messages`` can never drop a chunk, and
a device controls its own window. Bad requests are logged, counted and dropped;
the server keeps serving.

Fairness: paho's thread only reads who asks (the topic) and queues the raw request in
that device's line; a small pool of readers takes one request per device in turn (round
robin). A device has at most ``max_pending`` requests waiting (what it sends past that is
dropped and counted) and at most ``MAX_INFLIGHT`` replies on their way to the broker (an
agent keeps ``update.window``, 8, in flight, up to ``update.window_max``, 32, when more pays: the
rest wait in its line): without that second bound a flood's replies queued without limit on the
server's one connection, ahead of everyone else's.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from collections import Counter, deque
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from agent import logs
from agent.serve.ratelimit import ClientBuckets
from agent.settings import BrokerSettings
from agent.wire import REPO_REQUESTS, RepoReply, RepoRequest, WireError, parse_repo_request_topic, readable_request_id, repo_reply_topic
from fleet.transport import client as transport

log = logging.getLogger("edgefleet.repo_server")

__all__ = ["RepositoryServer"]

MAX_PENDING = 64  # requests one device may have waiting; eight windows of an agent's default
MAX_INFLIGHT = 8  # replies per device on their way to the broker (an agent's window): the rest of its line waits
DEVICE_RPS = 0.0  # optional requests a second per device (0: off; the in-flight cap already holds a flood to its share)
DEVICE_BURST = 128.0
READERS = 4  # reader threads: file reads overlap with publishing, and one slow disk read holds up nobody else
CHECKED_PATHS = 4096  # files whose place inside ROOT was checked, remembered (device, inode) so the check is not redone
METADATA_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")  # one file name of a director repository's metadata


class DirectorFiles(Protocol):
    """Where the director's metadata is read from when not from ROOT/director (``fleet.store.FleetStore``)."""

    def director_file(self, device: str, name: str) -> bytes | None: ...


class RepositoryServer:
    def __init__(
        self,
        root: str | Path,
        host: str | None = None,
        port: int | None = None,
        client_id: str = "edgefleet-repo-server",
        broker: BrokerSettings | None = None,
        readers: int = READERS,
        max_pending: int = MAX_PENDING,
        device_rps: float = DEVICE_RPS,
        device_burst: float = DEVICE_BURST,
        group: str | None = None,
        accepting: bool = True,
        director_store: DirectorFiles | None = None,
    ) -> None:
        """``broker``: TLS, credentials and MQTT version (fleet.toml's ``[broker]``); ``host``/``port`` replace its address.

        ``group``: several controllers share the requests through the MQTT 5 shared subscription ``$share/GROUP/...``
        (each request reaches one of them). ``accepting`` False: connected but not subscribed until ``accept(True)``
        (on a broker without ``$share`` only the leading controller takes requests: see ``fleet.controller``).
        ``director_store``: director requests are answered from it (every controller of a fleet serves what the leader
        signed, whatever its own ROOT holds); None: from ROOT/director."""
        self.root = Path(root).resolve()
        self.broker = transport.broker_settings(host, port, broker)
        self.host, self.port = self.broker.host, self.broker.port
        self.counters: Counter[str] = Counter()
        self.max_pending = max_pending
        self.director_store = director_store
        self.buckets = ClientBuckets(device_rps, device_burst)  # requests a second per device (0: no limit)
        self._checked: dict[str, tuple[str, tuple[int, int]]] = {}  # request path -> (real path, (device, inode))
        self._pending: dict[str, deque[bytes]] = {}  # raw requests per device, oldest first
        self._turns: deque[str] = deque()  # devices with requests waiting, in the order they are served
        self._work = threading.Condition(threading.RLock())  # RLock: paho may acknowledge inside publish()
        self._inflight: dict[str, int] = {}  # replies per device handed to paho and not yet acknowledged by the broker
        self._mids: dict[int, str] = {}  # message id -> device, until its PUBACK
        self._acked_early: set[int] = set()  # PUBACKs that came before publish() returned their mid
        self._held: set[str] = set()  # devices with requests waiting but MAX_INFLIGHT replies on the way
        self._stopping = False
        self._publish_lock = threading.Lock()  # paho is not safe to publish from several threads at once
        self._readers = [threading.Thread(target=self._read_loop, name=f"repo-reader-{i}", daemon=True) for i in range(readers)]
        self._topic = f"$share/{group}/{REPO_REQUESTS}" if group else REPO_REQUESTS
        self._accepting = accepting
        self._connected = threading.Event()
        self._client = transport.client(self.broker, client_id)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a: self._connected.set()
        self._client.on_publish = self._on_publish  # the broker took the subscription: requests reach us

    def start(self, timeout: float = 10.0) -> RepositoryServer:
        self._stopping = False
        for i, t in enumerate(self._readers):
            if not t.is_alive():
                self._readers[i] = t = threading.Thread(target=self._read_loop, name=t.name, daemon=True)
                t.start()
        transport.connect(self._client, self.broker)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise ConnectionError(f"repository server could not subscribe on {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify_all()
        for t in self._readers:
            if t.is_alive():
                t.join(5)
        self._client.disconnect()
        self._client.loop_stop()

    def alive(self) -> bool:
        """Every thread of the server runs (paho's network thread and the readers): part of the controller's health."""
        network = getattr(self._client, "_thread", None)
        return network is not None and network.is_alive() and all(t.is_alive() for t in self._readers)

    def __enter__(self) -> RepositoryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._work:  # acknowledgements of the old connection will not come: every line may move again
            self._inflight.clear()
            self._mids.clear()
            self._acked_early.clear()
            self._turns.extend(d for d in self._held if d in self._pending)
            self._held.clear()
            self._work.notify_all()
        if self._accepting:
            client.subscribe(self._topic, qos=1)
        else:
            self._connected.set()  # connected, and on purpose not taking requests yet

    def accept(self, on: bool) -> None:
        """Take repository requests (subscribe) or leave them to other controllers (unsubscribe); idempotent."""
        if on == self._accepting:
            return
        self._accepting = on
        if on:
            self._client.subscribe(self._topic, qos=1)
        else:
            self._client.unsubscribe(self._topic)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's network thread, which also publishes (one owner of the connection). Nothing here may raise."""
        try:
            self._handle(client, msg)
        except Exception as exc:  # a bug costs one request, never paho's thread (it re-raises and dies)
            self._count("internal_error")
            logs.event(log, "repo.internal_error", logging.ERROR, topic=msg.topic[:120], reason=f"{type(exc).__name__}: {exc}"[:300])

    def _handle(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        """paho's thread: who asks (from the topic) and a place in that device's line; decoding is the readers' work,
        so a flood costs this thread microseconds per message and delays nobody's request much."""
        try:
            device = parse_repo_request_topic(msg.topic)
        except WireError as exc:
            self._count("bad_topic")
            logs.event(log, "repo.bad_topic", logging.WARNING, topic=msg.topic[:120], reason=str(exc)[:200])
            return
        if not self.buckets.take(device):  # past its rate: dropped before it costs a read or a reply
            self._count("dropped")
            return
        with self._work:
            waiting = self._pending.setdefault(device, deque())
            if len(waiting) < self.max_pending:
                waiting.append(bytes(msg.payload))
                if len(waiting) == 1:
                    self._turns.append(device)
                self._work.notify()
                return
        # Dropped, not answered: thousands of answers would queue on our one connection ahead of everyone's. An agent
        # keeps at most ``update.window_max`` (<= 64) requests in flight and never gets here; a device that does times out
        # and asks again.
        self._count("dropped")

    def _read_loop(self) -> None:
        """One request per device in turn; a device with more waiting goes to the back of the line."""
        while True:
            with self._work:
                while not self._turns and not self._stopping:
                    self._work.wait()
                if self._stopping:
                    return
                device = self._turns.popleft()
                if self._inflight.get(device, 0) >= MAX_INFLIGHT:
                    self._held.add(device)  # back in line when one of its replies is acknowledged
                    continue
                waiting = self._pending[device]
                payload = waiting.popleft()
                if waiting:
                    self._turns.append(device)
                else:
                    del self._pending[device]
                self._inflight[device] = self._inflight.get(device, 0) + 1
            mid = None
            try:
                mid = self._answer(device, payload)
            except Exception as exc:  # a bug costs one request, never a reader
                self._count("internal_error")
                logs.event(log, "repo.internal_error", logging.ERROR, device=device, reason=f"{type(exc).__name__}: {exc}"[:300])
            with self._work:
                if mid is None:
                    self._release(device)
                elif mid in self._acked_early:
                    self._acked_early.discard(mid)
                    self._release(device)
                else:
                    self._mids[mid] = device

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any = None, properties: Any = None) -> None:
        """paho's thread: the broker has a reply; that device may have its next request read."""
        with self._work:
            device = self._mids.pop(mid, None)
            if device is None:
                self._acked_early.add(mid)
                return
            self._release(device)

    def _release(self, device: str) -> None:
        """One of ``device``'s replies is gone (caller holds the lock); a held line goes back into turn."""
        left = self._inflight.get(device, 1) - 1
        if left > 0:
            self._inflight[device] = left
        else:
            self._inflight.pop(device, None)
        if device in self._held and device in self._pending:
            self._held.discard(device)
            self._turns.append(device)
            self._work.notify()

    def _answer(self, device: str, payload: bytes) -> int | None:
        """Decode, serve, publish; the reply's message id (None when nothing was published)."""
        reply_topic = repo_reply_topic(device)  # from the topic the broker confines, never from the payload
        try:
            req = RepoRequest.decode(payload)
        except WireError as exc:
            self._count("bad_request")
            logs.event(log, "repo.bad_request", logging.WARNING, device=device, reason=str(exc), size=len(payload))
            rid = readable_request_id(payload)
            if rid is not None:  # the device can be told, instead of waiting out its retries
                return self._publish(reply_topic, RepoReply(rid, 400, error=str(exc)[:200]))
            return None
        reply = self.serve(req, device)
        self._count(f"status_{reply.status}")
        return self._publish(reply_topic, reply)

    def _count(self, what: str) -> None:
        with self._publish_lock:  # readers count at once: a Counter's += is not atomic
            self.counters[what] += 1

    def _publish(self, topic: str, reply: RepoReply) -> int | None:
        with self._publish_lock:
            info = self._client.publish(topic, reply.encode(), qos=1)
        return info.mid if info.rc == mqtt.MQTT_ERR_SUCCESS else None

    def serve(self, req: RepoRequest, device: str) -> RepoReply:
        """``req.path`` for ``device``: the image repository (shared) or that device's own director metadata, and
        nothing else under ROOT (a store, keys or another device's assignment placed there stay unreachable)."""
        if ".." in req.path.split("/"):
            return RepoReply(req.request_id, 404, error="not found")
        if req.path.startswith("image/"):
            base = self.root / "image"
        elif req.path.startswith(f"director/{device}/") and self.director_store is not None:
            return self._serve_stored(req, device)
        elif req.path.startswith(f"director/{device}/"):
            base = self.root / "director" / device
        else:
            return RepoReply(req.request_id, 404, error="not found")
        try:
            opened = self._open(req.path, base)
            if opened is None:
                return RepoReply(req.request_id, 404, error="not found")
            fd, size = opened
            try:
                if req.offset > size:
                    return RepoReply(req.request_id, 416, size, req.offset, error="offset past the end")
                return _read_reply(fd, req, size)
            finally:
                os.close(fd)
        except OSError as exc:
            logs.event(log, "repo.read_failed", logging.ERROR, path=req.path, reason=str(exc))
            return RepoReply(req.request_id, 500, error="read failed")

    def _open(self, path: str, base: Path) -> tuple[int, int] | None:
        """A descriptor of ROOT/``path`` and its size, when it is a regular file inside ``base`` (symlinks resolved:
        none may lead out); None when not. Why the cache: resolving the path is a dozen syscalls and most of a
        chunk's serving time, for each of a download's hundreds of requests. A cached file is opened without
        following a last symlink and must be the very file (device, inode) that was checked: a file replaced,
        moved or linked since is checked again."""
        known = self._checked.get(path)
        if known is not None:
            real, identity = known
            try:
                fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                fd = -1
            if fd >= 0:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == identity and stat.S_ISREG(st.st_mode):
                    return fd, st.st_size
                os.close(fd)
            self._checked.pop(path, None)
        resolved = (self.root / path).resolve()
        if not resolved.is_relative_to(base.resolve()) or not resolved.is_file():  # symlinks out too
            return None
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced since is_file()
            os.close(fd)
            return None
        if len(self._checked) >= CHECKED_PATHS:
            self._checked.clear()
        self._checked[path] = (str(resolved), (st.st_dev, st.st_ino))
        return fd, st.st_size

    def _serve_stored(self, req: RepoRequest, device: str) -> RepoReply:
        """``director/{device}/metadata/NAME`` from the store; nothing else of the director exists there."""
        assert self.director_store is not None
        name = req.path.removeprefix(f"director/{device}/metadata/")
        if name == req.path or not METADATA_NAME.fullmatch(name):
            return RepoReply(req.request_id, 404, error="not found")
        try:
            data = self.director_store.director_file(device, name)
        except Exception as exc:  # the store unreachable (psycopg's errors and kin): the device asks again later
            logs.event(log, "repo.store_failed", logging.ERROR, path=req.path, reason=f"{type(exc).__name__}: {exc}"[:300])
            return RepoReply(req.request_id, 500, error="store unavailable")
        if data is None:
            return RepoReply(req.request_id, 404, error="not found")
        if req.offset > len(data):
            return RepoReply(req.request_id, 416, len(data), req.offset, error="offset past the end")
        return RepoReply(req.request_id, 200, len(data), req.offset, data[req.offset : req.offset + req.length])


def _read_reply(fd: int, req: RepoRequest, size: int) -> RepoReply:
    """The 200 reply to ``req`` from ``fd`` (``size`` bytes), the chunk read straight into the encoded reply where
    ``os.preadv`` exists (one copy, from the page cache into the message); a file cut short meanwhile gives a short
    chunk, which the device refuses and asks for again."""
    length = min(req.length, size - req.offset)
    if not hasattr(os, "preadv"):
        return RepoReply(req.request_id, 200, size, req.offset, os.pread(fd, length, req.offset))
    reply = RepoReply.with_room(req.request_id, size, req.offset, length)
    got = os.preadv(fd, [reply.data], req.offset)
    if got < length:
        return RepoReply(req.request_id, 200, size, req.offset, bytes(reply.data[:got]))
    return reply
