"""The contract test: a real agent and the simulator side by side on a real broker, every message decoded by the same models.

A field or a message that one of them sends and the other does not is a failure: the
simulator is the rollout tests' load generator, and it must not drift from the agent again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from pydantic import BaseModel
from update_rig import MODEL, AgentProcess, Rig, Subscriber, wait_for

from agent import wire
from agent.client import EdgeClient, RemoteError
from agent.daemon import Agent
from agent.settings import load_settings
from fleet.dev.broker import start_broker
from fleet.dev.simulate import Simulator, SimulatorThread

OPTIONAL_BY_HARDWARE = {"system.temperature_c"}  # only where the machine has thermal sensors


def fields(message: BaseModel, prefix: str = "") -> set[str]:
    """Every field a message carries, as dotted paths (a map of models, like reported.models, as ``*``)."""
    out: set[str] = set()
    for name in message.model_fields_set:
        value = getattr(message, name)
        path = f"{prefix}{name}"
        if value is None:
            continue
        out.add(path)
        if isinstance(value, BaseModel):
            out |= fields(value, f"{path}.")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    out |= fields(item, f"{path}[].")
        elif isinstance(value, dict):
            for item in value.values():
                if isinstance(item, BaseModel):
                    out |= fields(item, f"{path}.*.")
    return out - OPTIONAL_BY_HARDWARE


def test_the_agent_and_the_simulator_speak_the_same_wire(rig: Rig, tmp_path: Path) -> None:
    agent_id, sim_id = "contract-agent", "contract-sim-0000"
    watch = Subscriber(rig.broker, [wire.device_filter("#"), wire.REPO_REQUESTS], "watch-contract")
    sim = Simulator(rig.broker.host, rig.broker.port, 1, "contract-sim", telemetry_s=0.3, initial={MODEL: "1.0.0"})
    rig.director.assign(sim_id, rig.image, MODEL, "1.0.0", "onnx-fp32", rig.keys)
    rig.assign(agent_id, "1.0.0")
    agent = Agent(load_settings(rig.write_config(agent_id), telemetry={"interval_s": 0.3, "prediction_every": 1})).start()
    sims = SimulatorThread(sim).start()
    stop = threading.Event()

    def traffic() -> None:
        rng = np.random.default_rng(0)
        with EdgeClient(rig.broker.host, rig.broker.port) as client:
            while not stop.is_set():
                try:
                    client.infer(agent_id, MODEL, rng.uniform(-1, 1, (2, 64)).astype(np.float32))
                except RemoteError as exc:  # the agent's per-client rate limit answered: back off, as a client should
                    if exc.code != "overloaded":
                        raise
                    stop.wait(0.05)

    loader = threading.Thread(target=traffic, daemon=True)
    try:
        wait_for(lambda: agent.host.get(MODEL) is not None, 60, "the agent serving 1.0.0")
        loader.start()
        for device in (agent_id, sim_id):  # each goes through an update: job messages, a new reported, repository requests
            rig.assign(device, "1.1.0")
        wait_for(lambda: agent.host.get(MODEL) is not None and agent.host.get(MODEL).version == "1.1.0", 60, "the agent on 1.1.0")
        wait_for(lambda: sim.devices[0].model_versions[MODEL] == "1.1.0", 60, "the simulator on 1.1.0")

        def seen(device: str) -> dict[str, set[str]]:
            kinds: dict[str, set[str]] = {}
            for topic, payload in list(watch.messages):
                if topic.startswith(wire.REPO_REQUESTS[:-1]) or not payload:
                    continue
                t = wire.parse_device_topic(topic)
                if t.device != device or t.kind not in ("status", "reported", "telemetry", "jobs"):
                    continue
                message = wire.decode_device_message(t, payload)  # any WireError fails the test
                if isinstance(message, wire.TelemetryBatch) and not any(m.count and m.predictions for m in message.models):
                    continue  # compare windows that served something (the simulator always does)
                kinds.setdefault(t.kind, set()).update(fields(message))
            return kinds

        required = {
            "telemetry": {"models[].predictions.sum", "models[].errors", "models[].p95_ms", "update.job"},
            "reported": {"models.*.sha256", "installed[].status", "preferred_variants", "session"},
        }

        def differences() -> list[str]:
            agent_fields, sim_fields = seen(agent_id), seen(sim_id)
            out = [f"{kind}: not seen from the agent" for kind in required if not required[kind] <= agent_fields.get(kind, set())]
            for kind in ("status", "reported", "telemetry", "jobs"):
                a, b = agent_fields.get(kind, set()), sim_fields.get(kind, set())
                if a != b or not a:
                    out.append(f"{kind}: only the agent sends {sorted(a - b)}, only the simulator {sorted(b - a)}")
            return out

        with contextlib.suppress(AssertionError):  # telemetry windows keep coming: until both have said everything once
            wait_for(lambda: not differences(), 30, "the same fields from both")
        assert differences() == []  # and if not, which ones
        reports = [
            wire.decode_device_message(wire.parse_device_topic(topic), payload)
            for topic, payload in list(watch.messages)
            if payload and topic == wire.device_topic(agent_id, "reported")
        ]
        assert reports and {getattr(r, "session", None) for r in reports} == {agent.session.number}  # each names its run
        requests: dict[str, int] = {}
        for topic, payload in list(watch.messages):
            if topic.startswith(wire.REPO_REQUESTS[:-1]):
                wire.RepoRequest.decode(payload)  # both send requests the server's decoder takes
                device = wire.parse_repo_request_topic(topic)
                requests[device] = requests.get(device, 0) + 1
        assert set(requests) == {agent_id, sim_id}
    finally:
        stop.set()
        loader.join(10)
        agent.stop()
        sims.stop()
        watch.close()


def test_the_agent_and_the_simulator_answer_a_late_will_of_their_own_run_with_ready(rig: Rig, tmp_path: Path) -> None:
    """On a broker cluster the will of a device's earlier connection can land after its new connection's ``ready`` (the
    node that held the old connection learns of the takeover late): the registry would keep the device offline, and a
    rollout would wait for it until its wave timed out (seen on a 3-node NATS cluster with a node killed). Both read
    their own status and say ``ready`` again; a will of an earlier run is none of theirs. The wills are published as
    a broker would: retained, by another client."""
    agent_id, sim_id = "late-will-agent", "late-will-sim-0000"
    topics = [wire.device_topic(d, "status") for d in (agent_id, sim_id)]
    watch = Subscriber(rig.broker, topics, "watch-late-will")
    agent = AgentProcess(rig.write_config(agent_id), tmp_path / "agent.log")
    sim = Simulator(rig.broker.host, rig.broker.port, 1, "late-will-sim", telemetry_s=5.0, initial={MODEL: "1.0.0"})
    sims = SimulatorThread(sim).start()
    broker = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="late-will-broker")
    broker.connect(rig.broker.host, rig.broker.port)
    broker.loop_start()
    try:
        sessions = {}
        for topic in topics:
            said = wait_for(lambda t=topic: [s for s in watch.json(t) if s["state"] == "ready"], 30, f"ready on {topic}")
            sessions[topic] = said[0]["session"]
        assert sessions[topics[1]] == sim.session
        own = sessions[topics[0]]

        def will(topic: str, session: int) -> None:
            lost = wire.encode(wire.Status(state="lost", session=session, ts=time.time()))
            broker.publish(topic, lost, qos=1, retain=True).wait_for_publish(5)

        # a will of the device's own run: answered (read live, or from the retained store when the device subscribes to
        # its status: it does once the broker took its ``ready``), which also shows its subscription is in place
        for topic in topics:
            will(topic, sessions[topic])
        for topic in topics:
            wait_for(lambda t=topic: _answered(watch.json(t), sessions[t]) >= 1, 30, f"ready again on {topic}")
        # an earlier run's will, then one of its own run's again: only the second is answered. Each device reads its
        # messages in order, so once its second answer is on record it has read the earlier run's will too.
        for topic in topics:
            will(topic, sessions[topic] - 1)
            will(topic, sessions[topic])
        for topic in topics:
            wait_for(lambda t=topic: _answered(watch.json(t), sessions[t]) >= 2, 30, f"ready again on {topic}")
        wait_for(lambda: agent.text().count(f"event=agent.presence_restored session={own} ") == 2, 10, "the agent's log")
        assert agent.text().count("event=agent.presence_restored") == 2
        wait_for(lambda: len(sim.presence_restored) >= 2, 10, "the simulator's answers counted")
        assert sim.presence_restored == [sim.session, sim.session]
        retained = Subscriber(rig.broker, topics, "watch-late-will-retained")  # what the registry reads after a restart
        try:
            for topic in topics:
                wait_for(lambda t=topic: retained.json(t), 10, f"the retained status of {topic}")
                assert retained.json(topic)[-1] == {**retained.json(topic)[-1], "state": "ready", "session": sessions[topic]}
        finally:
            retained.close()
    finally:
        broker.disconnect()
        broker.loop_stop()
        agent.stop()
        sims.stop()
        watch.close()


def test_the_agent_watches_its_status_again_on_a_broker_that_lost_its_session(rig: Rig, tmp_path: Path) -> None:
    """The agent subscribes to its own status once the broker took a connection's ``ready``, and stops listening for
    PUBACKs after that (paho calls the callback for every reply's). A broker restarted without persistence has lost
    the subscription with the session: the new connection's ``ready`` must subscribe again, or a late will of the
    run after the restart would leave the device offline in the registry."""
    broker = start_broker(tmp_path / "broker")
    device = "late-will-restart"
    topic = wire.device_topic(device, "status")
    config = rig.write_config(device)
    config.write_text(config.read_text().replace(f"port = {rig.broker.port}", f"port = {broker.port}"))
    agent = AgentProcess(config, tmp_path / "agent.log")
    owner = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="late-will-restart-broker")
    owner.reconnect_delay_set(1, 2)
    owner.connect(broker.host, broker.port)
    owner.loop_start()
    watchers: list[Subscriber] = []
    try:
        for connection in (1, 2):
            if connection == 2:
                broker.start_again()  # every session and retained message gone; the agent reconnects
            watch = Subscriber(broker, [topic], f"watch-late-will-restart-{connection}")
            watchers.append(watch)
            said = wait_for(lambda w=watch: [s for s in w.json(topic) if s["state"] == "ready"], 30, f"ready on connection {connection}")
            session = said[0]["session"]
            wait_for(owner.is_connected, 10, "the will's publisher connected")
            lost = wire.encode(wire.Status(state="lost", session=session, ts=time.time()))
            owner.publish(topic, lost, qos=1, retain=True).wait_for_publish(5)
            wait_for(lambda w=watch, s=session: _answered(w.json(topic), s) >= 1, 30, f"ready again on connection {connection}")
        # answered on the connection after the restart (mosquitto stopping also sends the agent its own will, which
        # it answers as the broker goes: how many answers in all is the broker's business)
        assert f"event=agent.presence_restored session={session} " in agent.text().split("event=agent.connected")[-1]
    finally:
        owner.disconnect()
        owner.loop_stop()
        agent.stop()
        for watch in watchers:
            watch.close()
        broker.stop()


def _answered(said: list[dict[str, object]], session: int) -> int:
    """How many ``lost`` of run ``session`` on a status topic were followed by a ``ready`` of that run (before the next will)."""
    out, waiting = 0, False
    for s in said:
        if s["state"] == "lost" and s["session"] == session:
            waiting = True
        elif s["state"] == "ready" and s["session"] == session and waiting:
            out, waiting = out + 1, False
    return out
