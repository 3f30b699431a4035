"""A clustered broker: several addresses, failover, and a node killed during a rollout on a 3-node NATS cluster.

The unit-level tests run on the session's mosquitto with a dead address beside it; the cluster test starts its own
nats-server nodes (JetStream + MQTT 3.1.1) and kills one with ``kill -9`` while a rollout to simulated devices and a
real agent is under way: everything reconnects to the other nodes, the rollout finishes, and every telemetry batch
the real agent numbered reaches the store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ModelFiles
from update_rig import MODEL, VARIANT, AgentProcess, Rig, wait_for

from agent.errors import InvalidOptions
from agent.session import Route, Session
from agent.settings import BrokerSettings, load_settings, write_config
from fleet.controller import Controller
from fleet.dev.broker import RunningBroker, free_port
from fleet.dev.nats import NatsCluster, start_nats_cluster
from fleet.dev.simulate import Simulator, SimulatorThread
from fleet.rollout import RolloutSpec
from fleet.transport import client as transport
from fleet.transport.announce import announce


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


# -- settings ---------------------------------------------------------------------------------


def test_hosts_lists_the_addresses_and_host_port_stays_a_one_element_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert BrokerSettings(host="b.example", port=1884).addresses() == [("b.example", 1884)]
    cluster = BrokerSettings(hosts=["10.0.0.1:1883", "[fd00::2]:1884"])
    assert cluster.addresses() == [("10.0.0.1", 1883), ("fd00::2", 1884)]
    assert (cluster.host, cluster.port) == ("10.0.0.1", 1883)  # logs and one-address code read the first
    monkeypatch.setenv("EDGEFLEET_BROKER__HOSTS", '["10.0.0.1:1883","10.0.0.2:1883"]')
    assert load_settings(tmp_path / "none.toml", device_id="d1").broker.addresses() == [("10.0.0.1", 1883), ("10.0.0.2", 1883)]
    monkeypatch.delenv("EDGEFLEET_BROKER__HOSTS")
    config = write_config(tmp_path / "agent.toml", {"device_id": "d1", "broker": {"hosts": ["a:1", "b:2"], "mqtt_version": "3.1.1"}})
    assert load_settings(config).broker.addresses() == [("a", 1), ("b", 2)]
    with pytest.raises(InvalidOptions, match="expected HOST:PORT"):
        load_settings(tmp_path / "none.toml", device_id="d1", broker={"hosts": ["no-port"]})
    # --broker a:1,b:2 replaces fleet.toml's addresses; TLS, credentials and the MQTT version stay
    base = BrokerSettings(host="old", mqtt_version="3.1.1", username="ctl")
    moved = transport.broker_settings(broker=base, hosts=["a:1", "b:2"])
    assert moved.addresses() == [("a", 1), ("b", 2)] and moved.mqtt_version == "3.1.1" and moved.username == "ctl"
    assert transport.broker_settings("c", 3, moved).addresses() == [("c", 3)]


# -- failover on one live broker and one dead address ----------------------------------------


def test_an_agent_given_a_dead_and_a_live_address_connects_to_the_live_one(mqtt_broker: RunningBroker) -> None:
    live = f"{mqtt_broker.host}:{mqtt_broker.port}"
    routes = [Route("cmd", lambda rest, payload, qos: None)]
    session = Session(BrokerSettings(hosts=[dead_address(), live]), "failover-unit", 1, routes, on_connected=lambda: None)
    session.start()
    try:
        assert session.wait_connected(20), "the agent never reached the live address"
        assert session._client.address == live
    finally:
        session.close()


def test_controller_clients_connect_to_the_first_address_that_answers(mqtt_broker: RunningBroker) -> None:
    live = f"{mqtt_broker.host}:{mqtt_broker.port}"
    b = BrokerSettings(hosts=[dead_address(), dead_address(), live])
    c = transport.client(b, "failover-controller")
    transport.connect(c, b)
    assert c.address == live
    c.disconnect()
    dead = BrokerSettings(hosts=[dead_address(), dead_address()])
    with pytest.raises(ConnectionRefusedError, match="no broker address answered") as refused:
        transport.connect(transport.client(dead, "failover-none"), dead)
    assert all(a in str(refused.value) for a in dead.hosts)


# -- a 3-node NATS cluster, one node killed during a rollout ------------------------------------


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = start_nats_cluster(tmp_path / "nats")
    yield cluster
    cluster.stop()


SIMULATED = 30


def test_a_node_killed_during_a_rollout_loses_nothing(nats: NatsCluster, models: ModelFiles, tmp_path: Path) -> None:
    """Node 1 carries the controller, the real agent and a third of the simulated devices; it dies mid-rollout."""
    broker = nats.broker_settings(0)  # everyone starts at node 1; the simulator spreads its devices over all three
    first = SimpleNamespace(host=broker.host, port=broker.port)
    rig = Rig(tmp_path / "fleet", models.path("mlp.onnx"), first)  # type: ignore[arg-type]
    for version in ("1.0.0", "1.1.0"):
        rig.release(version)
    controller = Controller(rig.serve, rig.keys, store=tmp_path / "fleet.db", tick_s=0.2, broker=broker).start()
    state = tmp_path / "agent"
    config = write_config(
        state / "agent.toml",
        {
            "device_id": "cl-agent",
            "state_dir": state,
            "broker": {"hosts": broker.hosts, "mqtt_version": "3.1.1"},
            "telemetry": {"interval_s": 0.3},
            "update": {
                "image_root": rig.image.metadata / "1.root.json",
                "director_root": rig.director.directory / "1.root.json",
                "retry_s": 0.3,
                "request_timeout_s": 2.0,
            },
        },
    )
    agent = AgentProcess(config, tmp_path / "agent.log")
    sim = Simulator("", 0, SIMULATED, "cl-sim", telemetry_s=0.3, initial={MODEL: "1.0.0"}, broker=broker)
    devices = ["cl-agent", *(d.id for d in sim.devices)]
    for device in devices:
        rig.director.assign(device, rig.image, MODEL, "1.0.0", VARIANT, rig.keys)
    announce(rig.director, ["cl-agent"], broker=broker)
    sims = SimulatorThread(sim).start()
    store = controller.store
    assert store is not None and controller.engine is not None
    try:
        wait_for(lambda: "event=host.swapped model=mlp version=1.0.0" in agent.text(), 90, "the real agent on 1.0.0")

        def registered() -> bool:
            return sum(1 for d in store.devices() if d.id.startswith("cl-") and d.online and d.models) == len(devices)

        wait_for(registered, 90, f"{len(devices)} devices registered")
        rid = controller.engine.start(RolloutSpec(MODEL, "1.1.0", selector="device=cl-*", waves=["10%", "50%", "100%"], soak_s=1.0))

        def versions() -> dict[str, str]:
            return {d.id: d.models.get(MODEL, {}).get("version", "") for d in store.devices() if d.id.startswith("cl-")}

        wait_for(lambda: "1.1.0" in versions().values(), 60, "the first wave moving")
        nats.kill(0)
        wait_for(lambda: sim.reconnects > 0 and sim.connected == SIMULATED, 90, "every simulated device reconnected")
        try:
            wait_for(lambda: getattr(store.rollout(rid), "state", "") == "done", 180, "the rollout done across the failover")
        except AssertionError as exc:  # say where it stood
            stuck = [d for d in store.rollout_devices(rid) if d.state != "active"]
            states = sorted(f"{d.device}:{d.state}:{d.reason}" for d in stuck)
            records = [(d.id, d.online, d.session, d.last_seen) for d in store.devices_of(m.device for m in stuck)]
            simulated = [(d.id, d.id in sim._online, d.address) for d in sim.devices if d.id in {m.device for m in stuck}]
            raise AssertionError(
                f"{exc}; {store.rollout(rid)}; not active: {states}; their records: {records}; the simulator's view: {simulated}; "
                f"versions: {versions()}"
            ) from None
        assert set(versions().values()) == {"1.1.0"}

        def offline() -> list[str]:
            return sorted(d.id for d in store.devices() if d.id.startswith("cl-") and not d.online)

        # a will of a device's earlier connection can reach the registry after its new ``ready`` (the nodes store each
        # on their own time): each device answers its run's ``lost`` with ``ready`` again, so none stays offline
        try:
            wait_for(lambda: not offline(), 30, "every device online in the registry after the failover")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {offline()}; wills the simulator answered: {len(sim.presence_restored)}") from None
        wait_for(lambda: "event=host.swapped model=mlp version=1.1.0" in agent.text(), 60, "the real agent on 1.1.0")
        assert "event=agent.connected" in agent.text().split("event=agent.disconnected", 1)[-1], "the agent came back"
        agent.stop()  # its last batch and the rest of its outbox go out before it exits
        with sqlite3.connect(state / "agent.db") as db:
            numbered = db.execute("SELECT value FROM meta WHERE key = 'telemetry_seq'").fetchone()[0]
            left = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        assert left == 0, f"{left} batches never acknowledged"

        def stored() -> set[int]:
            with sqlite3.connect(tmp_path / "fleet.db") as db:
                return {int(r[0]) for r in db.execute("SELECT seq FROM batches WHERE device = 'cl-agent'")}

        wait_for(lambda: stored() >= set(range(1, numbered + 1)), 30, f"all {numbered} of the agent's batches stored")
    finally:
        sims.stop()
        if agent.proc.poll() is None:
            agent.stop()
        controller.stop()


@pytest.mark.timeout(600)
def test_the_cluster_benchmark_runs_small_and_loses_nothing(tmp_path: Path) -> None:
    """``benchmarks/broker_cluster.py`` at 30 devices: its own 3-node cluster, both rollouts done, node 1 killed in the
    second, every device back, nothing lost; the JSON and the table written."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "benchmarks.broker_cluster", "--devices", "30", "--results", str(tmp_path)]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads((tmp_path / "broker_cluster.json").read_text())
    assert r["baseline"]["state"] == "done" and r["baseline"]["devices_moved"] == 30, r
    killed = r["killed"]
    assert killed["state"] == "done" and killed["devices_moved"] == 30 and "killed_at_s" in killed, r
    moving = killed["second_wave_at_kill"]  # killed while the second wave's devices were being told or moving
    assert moving.get("assigned", 0) + moving.get("active", 0) > 0, r
    assert killed["devices_on_node1"] >= 5 and killed["reconnects"] >= killed["devices_on_node1"] and killed["devices_back_s"] > 0, r
    assert r["lost"]["telemetry_acknowledged"] > 0 and r["lost"]["telemetry_lost"] == 0 and r["lost"]["jobs_not_active"] == 0, r
    assert r["presence"]["offline_in_registry"] == 0, r
    assert "| 3-wave rollout, 30 devices" in (tmp_path / "broker_cluster.md").read_text()


def test_on_nats_an_older_retained_report_replayed_to_a_controller_on_another_node_is_not_taken(nats: NatsCluster, tmp_path: Path) -> None:
    """The registry's guard against replays on the broker that showed the stall: a device reports 1.0.0, then 1.1.0
    (retained, through node 2); the controller's ingest leaves; the device's retained report goes back to 1.0.0 (as
    a node behind would hold it); the ingest comes back through node 3 and subscribes: nats-server replays the report
    with the retain flag, and the store keeps 1.1.0, counting the replay as stale."""
    import time

    import paho.mqtt.client as mqtt

    from agent import wire
    from fleet.store import FleetStore
    from fleet.transport.ingest import Ingestor

    now = time.time()

    def report(version: str, ts: float) -> bytes:
        model = wire.ReportedModel(version=version, variant="onnx-fp32", sha256="ab", runtime="onnx", device="CPU")
        body = wire.Reported(
            device_id="n-1", agent_version="t", hardware="x86_64", runtimes={"onnx": "1"}, preferred_variants=[],
            models={"m": model}, installed=[], ts=ts,
        )  # fmt: skip
        return wire.encode(body)

    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="n-1", protocol=mqtt.MQTTv311)
    host, port = nats.addresses[1].rsplit(":", 1)
    device.connect(host, int(port))
    device.loop_start()

    def publish(kind: str, payload: bytes) -> None:
        device.publish(wire.device_topic("n-1", kind), payload, qos=1, retain=True).wait_for_publish(10)

    store = FleetStore(tmp_path / "fleet.db")
    ingest = Ingestor(store, broker=nats.broker_settings(0), client_id="ingest-nats-1").start()
    try:
        publish("status", wire.encode(wire.Status(state="ready", session=1, ts=now)))  # type: ignore[arg-type]
        publish("reported", report("1.0.0", now - 60))
        publish("reported", report("1.1.0", now))
        wait_for(lambda: (d := store.device("n-1")) is not None and d.models.get("m", {}).get("version") == "1.1.0", 30, "1.1.0")
        ingest.stop()
        publish("reported", report("1.0.0", now - 60))
        ingest = Ingestor(store, broker=nats.broker_settings(2), client_id="ingest-nats-2").start()
        wait_for(lambda: store.stale_reports == 1, 30, "the replay counted as stale")
        d = store.device("n-1")
        assert d is not None and d.models["m"]["version"] == "1.1.0"
    finally:
        ingest.stop()
        store.close()
        device.disconnect()
        device.loop_stop()
