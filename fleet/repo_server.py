"""Serve a repository directory (TUF metadata and targets) to devices over MQTT.

Devices pull: each request names a path, an offset and a length (at most 256 KiB),
and the reply goes to the device's own reply topic. Nothing is ever pushed into a
device's queue, so mosquitto's ``max_queued_messages`` can never drop a chunk, and
a device controls its own window. Bad requests are logged, counted and dropped;
the server keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent import logs
from agent.mqtt import tcp_nodelay
from agent.wire import REPO_REQUEST, RepoReply, RepoRequest, WireError, reply_address

log = logging.getLogger("edgefleet.repo_server")

__all__ = ["RepositoryServer"]


class RepositoryServer:
    def __init__(self, root: str | Path, host: str, port: int, client_id: str = "edgefleet-repo-server") -> None:
        self.root = Path(root).resolve()
        self.host, self.port = host, port
        self.counters: Counter[str] = Counter()
        self._connected = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a: self._connected.set()  # the broker took the subscription: requests reach us
        self._client.on_socket_open = tcp_nodelay

    def start(self, timeout: float = 10.0) -> RepositoryServer:
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise ConnectionError(f"repository server could not subscribe on {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> RepositoryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(REPO_REQUEST, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Runs on paho's network thread, which also publishes: one owner of the connection.
        try:
            req = RepoRequest.decode(bytes(msg.payload))
        except WireError as exc:
            self.counters["bad_request"] += 1
            logs.event(log, "repo.bad_request", logging.WARNING, reason=str(exc), size=len(msg.payload))
            address = reply_address(bytes(msg.payload))
            if address is not None:  # the device can be told, instead of waiting out its retries
                client.publish(address[1], RepoReply(address[0], 400, error=str(exc)[:200]).encode(), qos=1)
            return
        reply = self.serve(req)
        self.counters[f"status_{reply.status}"] += 1
        client.publish(req.reply_to, reply.encode(), qos=1)

    def serve(self, req: RepoRequest) -> RepoReply:
        path = (self.root / req.path).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():  # also refuses symlinks that lead outside
            return RepoReply(req.request_id, 404, error="not found")
        try:
            size = path.stat().st_size
            if req.offset > size:
                return RepoReply(req.request_id, 416, size, req.offset, error="offset past the end")
            with open(path, "rb") as f:
                f.seek(req.offset)
                data = f.read(req.length)
        except OSError as exc:
            logs.event(log, "repo.read_failed", logging.ERROR, path=req.path, reason=str(exc))
            return RepoReply(req.request_id, 500, error="read failed")
        return RepoReply(req.request_id, 200, size, req.offset, data)
