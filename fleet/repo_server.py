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
from agent.settings import BrokerSettings
from agent.wire import REPO_REQUESTS, RepoReply, RepoRequest, WireError, parse_repo_request_topic, readable_request_id, repo_reply_topic
from fleet import transport

log = logging.getLogger("edgefleet.repo_server")

__all__ = ["RepositoryServer"]


class RepositoryServer:
    def __init__(
        self,
        root: str | Path,
        host: str | None = None,
        port: int | None = None,
        client_id: str = "edgefleet-repo-server",
        broker: BrokerSettings | None = None,
    ) -> None:
        """``broker``: TLS, credentials and MQTT version (fleet.toml's ``[broker]``); ``host``/``port`` replace its address."""
        self.root = Path(root).resolve()
        self.broker = transport.broker_settings(host, port, broker)
        self.host, self.port = self.broker.host, self.broker.port
        self.counters: Counter[str] = Counter()
        self._connected = threading.Event()
        self._client = transport.client(self.broker, client_id)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a: self._connected.set()  # the broker took the subscription: requests reach us

    def start(self, timeout: float = 10.0) -> RepositoryServer:
        transport.connect(self._client, self.broker)
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
        client.subscribe(REPO_REQUESTS, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's network thread, which also publishes (one owner of the connection). Nothing here may raise."""
        try:
            self._handle(client, msg)
        except Exception as exc:  # a bug costs one request, never paho's thread (it re-raises and dies)
            self.counters["internal_error"] += 1
            logs.event(log, "repo.internal_error", logging.ERROR, topic=msg.topic[:120], reason=f"{type(exc).__name__}: {exc}"[:300])

    def _handle(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        try:
            device = parse_repo_request_topic(msg.topic)
        except WireError as exc:
            self.counters["bad_topic"] += 1
            logs.event(log, "repo.bad_topic", logging.WARNING, topic=msg.topic[:120], reason=str(exc)[:200])
            return
        reply_topic = repo_reply_topic(device)  # from the topic the broker confines, never from the payload
        try:
            req = RepoRequest.decode(bytes(msg.payload))
        except WireError as exc:
            self.counters["bad_request"] += 1
            logs.event(log, "repo.bad_request", logging.WARNING, device=device, reason=str(exc), size=len(msg.payload))
            rid = readable_request_id(bytes(msg.payload))
            if rid is not None:  # the device can be told, instead of waiting out its retries
                client.publish(reply_topic, RepoReply(rid, 400, error=str(exc)[:200]).encode(), qos=1)
            return
        reply = self.serve(req, device)
        self.counters[f"status_{reply.status}"] += 1
        client.publish(reply_topic, reply.encode(), qos=1)

    def serve(self, req: RepoRequest, device: str) -> RepoReply:
        """``req.path`` for ``device``: the image repository (shared) or that device's own director metadata, and
        nothing else under ROOT (a store, keys or another device's assignment placed there stay unreachable)."""
        if not (req.path.startswith("image/") or req.path.startswith(f"director/{device}/")):
            return RepoReply(req.request_id, 404, error="not found")
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
