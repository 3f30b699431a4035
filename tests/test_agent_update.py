"""The agent's update state machine end to end: real mosquitto, real signatures, real models, the real daemon class."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from update_rig import MODEL, Rig, Subscriber, fails_beyond_batch_one, unloadable_model, wait_for, wrong_golden_outputs

from agent import commands
from agent.daemon import Agent
from agent.errors import EdgefleetError
from agent.wire import RepoReply, RepoRequest, device_topic, parse_repo_request_topic, repo_reply_topic
from fleet.controller import devices
from fleet.dev.broker import RunningBroker


class JobWatcher(Subscriber):
    """Everything a device publishes on its job topics, in order."""

    def __init__(self, broker: RunningBroker, device: str) -> None:
        super().__init__(broker, [device_topic(device, "jobs", "#")], f"watch-{device}")

    def states(self, target: str | None = None) -> list[str]:
        return [m["state"] for m in self.json() if target is None or m.get("target_path") == target]

    def last(self, state: str) -> dict[str, Any] | None:
        return next((m for m in reversed(self.json()) if m["state"] == state), None)


@pytest.fixture
def agent_for(rig: Rig) -> Iterator[Any]:
    started: list[tuple[Agent, JobWatcher]] = []

    def start(device: str, runtime: str = "", **update: Any) -> tuple[Agent, JobWatcher]:
        watcher = JobWatcher(rig.broker, device)
        agent = Agent(rig.settings(device, runtime, **update)).start()
        assert agent.wait_connected()
        started.append((agent, watcher))
        return agent, watcher

    yield start
    for agent, watcher in started:
        agent.stop()
        watcher.close()


def serving(agent: Agent, version: str) -> bool:
    m = agent.host.get(MODEL)
    return m is not None and m.version == version


def x(rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(rows).uniform(-1, 1, (rows, 64)).astype(np.float32)}


def test_assigned_model_is_installed_and_reported_active(rig: Rig, agent_for: Any) -> None:
    agent, jobs = agent_for("dev-a")
    rig.assign("dev-a", "1.0.0")
    wait_for(lambda: serving(agent, "1.0.0"), what="1.0.0 serving")
    target = "mlp/1.0.0/onnx-fp32.tar"
    wait_for(lambda: "ACTIVE" in jobs.states(target), what="ACTIVE on the job topic")
    assert jobs.states(target) == ["IDLE", "DOWNLOADING", "VERIFYING", "STAGED", "HEALTH_CHECK", "ACTIVE"]
    assert jobs.last("ACTIVE")["status"] == "SUCCEEDED"  # type: ignore[index]
    assert agent.host.infer(MODEL, x(3))["y"].shape == (3, 10)
    # the controller sees it: `fleet devices` reads the retained status and reported messages
    report = wait_for(
        lambda: next(
            (d for d in devices(rig.broker.host, rig.broker.port, 0.5) if d.device_id == "dev-a" and d.reported.get("models")), None
        ),
        what="dev-a's report",
    )
    assert report.status["state"] == "ready" and report.reported["models"][MODEL]["version"] == "1.0.0"
    status = commands.status(agent.settings)
    assert [(m["version"], m["status"]) for m in status["installed"]] == [("1.0.0", "active")]
    leftovers = [p for d in ("downloads", "staging") for p in (agent.settings.state_dir / d).iterdir()]
    assert leftovers == []


def test_hot_swap_under_steady_load_fails_no_request(rig: Rig, agent_for: Any) -> None:
    agent, _ = agent_for("dev-b")
    rig.assign("dev-b", "1.0.0")
    wait_for(lambda: serving(agent, "1.0.0"), what="1.0.0 serving")
    old_runtime = agent.host.get(MODEL).runtime  # type: ignore[union-attr]
    stop, errors, served = threading.Event(), [], {"1.0.0": 0, "1.1.0": 0}
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            try:
                m = agent.host.get(MODEL)
                agent.host.infer(MODEL, x(2))
                with lock:
                    served[m.version] += 1  # type: ignore[union-attr]
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: served["1.0.0"] > 50, what="load on 1.0.0")
        rig.assign("dev-b", "1.1.0")
        wait_for(lambda: serving(agent, "1.1.0"), what="1.1.0 serving")
        wait_for(lambda: served["1.1.0"] > 50, what="load on 1.1.0")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    with pytest.raises(EdgefleetError):
        old_runtime.infer(x())  # the old model was closed after its last request

    def installed() -> dict[str, str]:
        return {m["version"]: m["status"] for m in commands.status(agent.settings)["installed"]}

    wait_for(lambda: installed() == {"1.1.0": "active", "1.0.0": "kept"}, what="1.1.0 active, 1.0.0 kept")


@pytest.mark.parametrize(
    ("version", "tamper", "reason"),
    [("2.0.0", wrong_golden_outputs, "golden sample"), ("2.1.0", unloadable_model, "no runtime could run this model")],
)
def test_a_model_failing_its_health_check_is_rejected_and_the_old_one_keeps_serving(
    rig: Rig, agent_for: Any, version: str, tamper: Any, reason: str
) -> None:
    device = f"dev-h{version.replace('.', '')}"
    agent, jobs = agent_for(device)
    rig.assign(device, "1.0.0")
    wait_for(lambda: serving(agent, "1.0.0"), what="1.0.0 serving")
    rig.release(version, tamper)
    rig.assign(device, version)
    rejected = wait_for(lambda: jobs.last("REJECTED"), what="REJECTED")
    assert rejected["status"] == "REJECTED" and reason in rejected["reason"]
    assert serving(agent, "1.0.0") and agent.host.infer(MODEL, x())["y"].shape == (1, 10)
    rounds = agent.rounds
    agent.check_now()  # asked again, the same artifact is not tried a second time
    wait_for(lambda: agent.rounds > rounds, what="the check")
    assert jobs.states().count("REJECTED") == 1
    assert len(list((agent.settings.state_dir / "models").iterdir())) == 1  # nothing of the rejected model stays


def test_a_model_slower_than_the_latency_budget_is_rejected(rig: Rig, agent_for: Any) -> None:
    agent, jobs = agent_for("dev-slow", runtime="latency_budget_ms = 0.000001")  # no model is this fast
    rig.assign("dev-slow", "1.0.0")
    rejected = wait_for(lambda: jobs.last("REJECTED"), what="REJECTED")
    assert "exceeds the budget" in rejected["reason"] and agent.host.get(MODEL) is None


def test_rollback_command_and_automatic_rollback(rig: Rig, agent_for: Any) -> None:
    agent, jobs = agent_for("dev-r", auto_rollback_failures=3)
    rig.assign("dev-r", "1.0.0")
    wait_for(lambda: serving(agent, "1.0.0"), what="1.0.0 serving")
    rig.assign("dev-r", "1.1.0")
    wait_for(lambda: serving(agent, "1.1.0"), what="1.1.0 serving")
    reply = commands.rollback(MODEL, agent.settings)  # over MQTT, as `edge-agent rollback` and the controller do
    assert reply["ok"] and reply["result"]["version"] == "1.0.0" and serving(agent, "1.0.0")
    assert wait_for(lambda: jobs.last("ROLLED_BACK"), what="ROLLED_BACK")["version"] == "1.1.0"
    rounds = agent.rounds
    agent.check_now()  # the director still names 1.1.0, but the device rolled it back: it stays on 1.0.0
    wait_for(lambda: agent.rounds > rounds, what="the check")
    assert serving(agent, "1.0.0")
    bad = commands.send_command(agent.settings, "rollback", {"model": "nope"})
    assert not bad["ok"] and bad["error"]["code"] == "rollback_failed"
    assert not commands.send_command(agent.settings, "explode", {})["ok"]

    # a release that passes its health check but fails in service is rolled back by itself
    rig.release("3.0.0", fails_beyond_batch_one)
    rig.assign("dev-r", "3.0.0")
    wait_for(lambda: serving(agent, "3.0.0"), what="3.0.0 serving")
    assert agent.host.infer(MODEL, x(1))["y"].shape == (1, 10)
    for _ in range(3):
        with pytest.raises(EdgefleetError):
            agent.host.infer(MODEL, x(4))
    wait_for(lambda: serving(agent, "1.0.0"), what="automatic rollback to 1.0.0")
    assert agent.host.infer(MODEL, x(4))["y"].shape == (4, 10)
    assert (
        "inference failures in a row"
        in wait_for(lambda: jobs.last("ROLLED_BACK") if jobs.last("ROLLED_BACK")["version"] == "3.0.0" else None)["reason"]
    )  # type: ignore[index]


def test_corrupted_chunks_are_detected_and_requested_again(rig: Rig, agent_for: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A relay between device and repository (a compromised bridge) flips bytes in two chunks, then truncates one."""
    corrupted: list[int] = []
    truncated: list[int] = []

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device = parse_repo_request_topic(msg.topic)
        req = RepoRequest.decode(msg.payload)
        reply = rig.controller.server.serve(req, device)  # the repository's own answer...
        if req.path.endswith(".onnx-fp32.tar") and len(corrupted) < 2:
            data = bytearray(reply.data)
            data[len(data) // 2] ^= 0xFF  # ...tampered with on the way
            corrupted.append(req.offset)
            reply = RepoReply(req.request_id, 200, reply.total, req.offset, bytes(data))
        elif req.path.endswith(".onnx-fp32.tar") and not truncated:
            truncated.append(req.offset)
            reply = RepoReply(req.request_id, 200, reply.total, req.offset, reply.data[: len(reply.data) // 2])
        client.publish(repo_reply_topic(device), reply.encode(), qos=1)

    relay = rig.relay("relay", on_message)  # only the relay answers now
    try:
        agent, jobs = agent_for("dev-c")
        rig.assign("dev-c", "1.0.0")
        wait_for(lambda: serving(agent, "1.0.0"), what="1.0.0 serving despite the corruption")
    finally:
        relay.disconnect()
        relay.loop_stop()
        rig.controller.server.start()
    detected = [r.getMessage() for r in caplog.records if "event=download.bad_chunk" in r.getMessage()]
    assert len(corrupted) == 2 and len(truncated) == 1
    assert len(detected) == 2  # each flipped chunk caught on arrival and fetched again from the last verified chunk
    # the truncated reply is a short read: the rest was requested from where it ended, and every byte still checked
    assert jobs.states().count("REJECTED") == 0


def test_metadata_refusal_is_reported_and_the_model_keeps_serving(rig: Rig, agent_for: Any) -> None:
    import shutil

    from fleet.tuf.director import Director
    from fleet.tuf.keys import UntrustedSigningKey, init_keys

    agent, jobs = agent_for("dev-m")
    rig.assign("dev-m", "1.0.0")
    wait_for(lambda: serving(agent, "1.0.0"), what="1.0.0 serving")
    impostor = init_keys(rig.root / "impostor")  # a director key the root does not name
    with pytest.raises(UntrustedSigningKey):  # the controller's own signing refuses it
        rig.director.assign("dev-m", rig.image, MODEL, "1.1.0", "onnx-fp32", impostor)
    # the impostor signs with its own director and puts the files where the device fetches them
    forged = Director.create(rig.root / "impostor-director", impostor)
    served = rig.director.device_metadata("dev-m")
    shutil.copytree(served, forged.device_metadata("dev-m"))
    forged.assign("dev-m", rig.image, MODEL, "1.1.0", "onnx-fp32", impostor)
    for f in forged.device_metadata("dev-m").glob("*.json"):
        if not f.name.endswith(".root.json"):
            shutil.copy(f, served / f.name)
    agent.check_now()
    refused = wait_for(lambda: jobs.last("REJECTED"), what="the refusal")
    assert "UnsignedMetadataError" in refused["reason"]
    assert serving(agent, "1.0.0") and agent.host.infer(MODEL, x())["y"].shape == (1, 10)
    rig.assign("dev-m", "1.1.0")  # the controller signs with the right key: the update goes through
    wait_for(lambda: serving(agent, "1.1.0"), what="1.1.0 after the fix")


def test_controller_re_signs_online_metadata_before_it_expires_and_tells_the_device(rig: Rig) -> None:
    from datetime import datetime, timedelta, timezone

    from tuf.api.metadata import Metadata

    from fleet.tuf.director import Director

    short = Director(rig.director.directory, timestamp_expiry=timedelta(seconds=30))
    short.assign("dev-t", rig.image, MODEL, "1.0.0", "onnx-fp32", rig.keys)
    ts_path = rig.director.device_metadata("dev-t") / "timestamp.json"
    before = Metadata.from_file(str(ts_path)).signed
    retained: list[bytes] = []
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watch-dev-t")
    watcher.on_message = lambda c, u, m: retained.append(bytes(m.payload))
    watcher.connect(rig.broker.host, rig.broker.port)
    watcher.subscribe(device_topic("dev-t", "director", "#"), qos=1)
    watcher.loop_start()
    try:
        assert "dev-t" in rig.controller.tick()  # 30 s left of a 1-day lifetime: re-signed now
        after = Metadata.from_file(str(ts_path)).signed
        assert after.version > before.version and after.expires - datetime.now(timezone.utc) > timedelta(hours=23)
        wait_for(lambda: any(json.loads(p)["signed"]["version"] == after.version for p in retained), 10, "the announcement")
        assert "dev-t" not in rig.controller.tick()  # fresh now: left alone
    finally:
        watcher.disconnect()
        watcher.loop_stop()


def test_the_first_telemetry_on_a_new_version_comes_soon_after_the_switch(rig: Rig) -> None:
    """``telemetry.first_report_s``: after an update the next batch comes that soon, not at the interval's end (60 s
    here), and says how long its window was; a rollout's gate and the dashboard see the new version within seconds."""
    import time

    from agent.settings import load_settings

    config = rig.write_config("dev-soon")
    config.write_text(config.read_text() + "[telemetry]\ninterval_s = 60\nfirst_report_s = 0.5\n")
    topic = device_topic("dev-soon", "telemetry")
    telemetry = Subscriber(rig.broker, [topic], "watch-soon-telemetry")
    jobs = JobWatcher(rig.broker, "dev-soon")
    agent = Agent(load_settings(config)).start()
    try:
        assert agent.wait_connected()
        rig.assign("dev-soon", "1.0.0")
        active = wait_for(lambda: jobs.last("ACTIVE"), what="ACTIVE")
        batch = wait_for(
            lambda: next((b for b in telemetry.json(topic) if [m["version"] for m in b["models"]] == ["1.0.0"]), None),
            20,
            "a batch on 1.0.0",
        )
        assert 0 < batch["ts"] - active["updated"] < 5 and batch["interval_s"] < 30
        assert batch["seq"] == 1 and time.time() - active["updated"] < 30  # the first batch of all, well before the interval
    finally:
        agent.stop()
        telemetry.close()
        jobs.close()
