"""A local NATS cluster with JetStream and MQTT, for tests and benchmarks of a clustered broker (``start_nats_cluster``).

Why NATS: nats-server is one static binary that clusters (routes between nodes), keeps MQTT sessions, retained
messages and QoS 1 queues in JetStream — replicated, so a node killed with ``kill -9`` takes nothing with it — and
lets a client move to another node. It speaks MQTT 3.1.1 only and has no ``$share``: clients use
``mqtt_version = "3.1.1"`` (``NatsCluster.broker_settings``). Each node gets its own free ports (client, cluster
routes, MQTT, monitoring) and its own store directory under the work directory; ready means every node's monitoring
endpoint names a JetStream meta leader and every node took a QoS 1 publish over MQTT, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.settings import BrokerSettings
from fleet.dev.broker import BrokerStartError, free_port

__all__ = ["NatsCluster", "NatsNode", "nats_binary", "start_nats_cluster"]

HOST = "127.0.0.1"


def nats_binary() -> str | None:
    """nats-server on PATH or where Debian installs it; None when it is not installed."""
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.access(p, os.X_OK)), None
    )


@dataclass
class NatsNode:
    name: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.mqtt_port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def config(self, routes: list[int], mqtt_options: str = "") -> str:
        """Replicas as many as nodes, said outright: left to itself a node creates MQTT's streams (sessions, retained,
        QoS 1 queues) with as many replicas as it sees peers at the first MQTT connection, and a stream made with 2
        of 3 loses its quorum with either node (measured: every client of the killed node refused for good)."""
        extra = f", {mqtt_options}" if mqtt_options else ""
        route_urls = ", ".join(f'"nats-route://{HOST}:{p}"' for p in routes)
        return (
            f'server_name: "{self.name}"\n'
            f"listen: {HOST}:{self.client_port}\n"
            f"http: {HOST}:{self.http_port}\n"
            f'jetstream {{ store_dir: "{self.workdir / "store"}" }}\n'
            f'cluster {{ name: "edgefleet", listen: {HOST}:{self.cluster_port}, routes: [{route_urls}] }}\n'
            f"mqtt {{ listen: {HOST}:{self.mqtt_port}, stream_replicas: {len(routes) + 1}{extra} }}\n"
        )

    def _monitor(self, endpoint: str) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/{endpoint}", timeout=2) as r:
                answer = json.loads(r.read())
        except (OSError, ValueError):
            return {}
        return answer if isinstance(answer, dict) else {}

    def routes(self) -> int:
        """Routes to other nodes this node has (monitoring ``/routez``)."""
        return int(self._monitor("routez").get("num_routes", 0))

    def meta_leader(self) -> str | None:
        """The JetStream meta leader this node knows (monitoring ``/jsz``); None while there is none or no answer."""
        leader = self._monitor("jsz").get("meta_cluster", {}).get("leader")
        return str(leader) if leader else None


@dataclass
class NatsCluster:
    nodes: list[NatsNode]
    workdir: Path

    @property
    def addresses(self) -> list[str]:
        """Every node's MQTT address, ``HOST:PORT``, in node order (``BrokerSettings.hosts``)."""
        return [n.address for n in self.nodes]

    def broker_settings(self, first: int = 0) -> BrokerSettings:
        """Settings for clients of this cluster: every node, starting at node ``first``, MQTT 3.1.1."""
        order = self.addresses[first:] + self.addresses[:first]
        return BrokerSettings(hosts=order, mqtt_version="3.1.1")

    def kill(self, index: int) -> None:
        """``kill -9`` one node: no clean shutdown, its clients' connections just end."""
        node = self.nodes[index]
        if node.process is not None and node.alive():
            os.kill(node.process.pid, signal.SIGKILL)
            node.process.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            if node.process is not None and node.alive():
                node.process.terminate()
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(timeout)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Every node is routed to every other, names a meta leader and takes a QoS 1 publish over MQTT (JetStream
        stores MQTT's sessions)."""
        deadline = time.monotonic() + timeout
        pending = list(self.nodes)
        while pending:
            node = pending[0]
            if not node.alive():
                raise BrokerStartError(f"nats node {node.name} exited: {(node.workdir / 'nats.log').read_text()[-2000:]}")
            routed = node.routes() >= len(self.nodes) - 1
            if (
                routed
                and node.meta_leader() is not None
                and _mqtt_publish_acked(node.mqtt_port, min(5.0, max(0.5, deadline - time.monotonic())))
            ):
                pending.pop(0)
            elif time.monotonic() > deadline:
                raise BrokerStartError(f"nats node {node.name} not ready within {timeout:.0f} s (meta leader: {node.meta_leader()})")
            else:
                time.sleep(0.2)  # polling interval of the readiness checks above


def _mqtt_publish_acked(port: int, timeout: float) -> bool:
    """One MQTT 3.1.1 QoS 1 publish acknowledged by the node at ``port``."""
    acked = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"nats-ready-{port}", protocol=mqtt.MQTTv311)
    c.on_connect = lambda client, *a: client.publish("edgefleet/ready", b"1", qos=1)
    c.on_publish = lambda *a: acked.set()
    try:
        c.connect(HOST, port, keepalive=10)
    except OSError:
        return False
    c.loop_start()
    try:
        return acked.wait(timeout)
    finally:
        c.disconnect()
        c.loop_stop()


def start_nats_cluster(workdir: Path, size: int = 3, timeout: float = 60.0, mqtt_options: str = "") -> NatsCluster:
    """``size`` nats-server nodes with JetStream and MQTT, routed to each other, ready (see ``NatsCluster.wait_ready``).
    ``mqtt_options``: more of the ``mqtt {}`` block, as nats-server's config spells them (``consumer_memory_storage: true``)."""
    binary = nats_binary()
    if binary is None:
        raise BrokerStartError("nats-server is not installed (Debian: apt-get install nats-server)")
    nodes = [NatsNode(f"n{i + 1}", free_port(), free_port(), free_port(), free_port(), workdir / f"n{i + 1}") for i in range(size)]
    for node in nodes:
        node.workdir.mkdir(parents=True, exist_ok=True)
        conf = node.workdir / "nats.conf"
        conf.write_text(node.config([n.cluster_port for n in nodes if n is not node], mqtt_options))
        log = open(node.workdir / "nats.log", "ab")
        node.process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        log.close()
    cluster = NatsCluster(nodes, workdir)
    try:
        cluster.wait_ready(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
