"""The agent as a daemon: presence, persistent session, telemetry store-and-forward, systemd notify, SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import ModelFiles
from update_rig import AgentProcess, Rig, Subscriber, wait_for

from agent.commands import send_command
from agent.daemon import Agent
from agent.settings import load_settings
from agent.wire import device_topic
from fleet.dev.broker import RunningBroker, start_broker


@pytest.fixture
def rig(models: ModelFiles, mqtt_broker: RunningBroker, tmp_path: Path) -> Rig:
    """Keys and repositories only: these tests need no model."""
    return Rig(tmp_path, models.path("mlp.onnx"), mqtt_broker)


def test_presence_session_counter_will_and_clean_shutdown(rig: Rig, tmp_path: Path) -> None:
    topic = device_topic("pres-1", "status")
    watch = Subscriber(rig.broker, [topic, device_topic("pres-1", "reported")], "watch-pres")
    config = rig.write_config("pres-1")
    try:
        first = AgentProcess(config, tmp_path / "a.log")
        wait_for(lambda: any(s["state"] == "ready" for s in watch.json(topic)), 30, "ready")
        assert first.stop() == 0
        wait_for(lambda: watch.json(topic)[-1]["state"] == "disconnected", 10, "disconnected")  # said before leaving
        second = AgentProcess(config, tmp_path / "b.log")
        wait_for(lambda: watch.json(topic)[-1]["state"] == "ready", 30, "ready again")
        assert watch.json(topic)[-1]["session"] == watch.json(topic)[0]["session"] + 1
        second.kill9()
        lost = wait_for(lambda: watch.json(topic)[-1] if watch.json(topic)[-1]["state"] == "lost" else None, 30, "the will")
        assert lost["session"] == watch.json(topic)[-2]["session"]  # the will names the session it belonged to
        reported = watch.json(device_topic("pres-1", "reported"))[-1]
        assert reported["device_id"] == "pres-1" and "onnx" in reported["runtimes"] and reported["hardware"]
    finally:
        watch.close()


def test_commands_sent_while_the_agent_is_offline_arrive_when_it_returns(rig: Rig, tmp_path: Path) -> None:
    config = rig.write_config("sess-1")
    settings = load_settings(config)
    replies = Subscriber(rig.broker, [device_topic("sess-1", "cmd", "reply")], "watch-sess")
    try:
        agent = AgentProcess(config, tmp_path / "a.log")
        wait_for(lambda: "event=agent.connected" in agent.text(), 30, "connected")
        assert send_command(settings, "ping", {})["ok"]
        assert agent.stop() == 0  # clean disconnect; the broker keeps the session (SessionExpiryInterval)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="controller-x")
        c.connect(rig.broker.host, rig.broker.port)
        c.loop_start()
        c.publish(device_topic("sess-1", "cmd"), json.dumps({"request_id": "queued-1", "command": "ping"}), qos=1).wait_for_publish(5)
        c.disconnect()
        c.loop_stop()
        agent = AgentProcess(config, tmp_path / "b.log")
        got = wait_for(lambda: [r for r in replies.json(device_topic("sess-1", "cmd", "reply")) if r.get("request_id") == "queued-1"], 30)
        assert got[0]["ok"] is True
        assert agent.stop() == 0
    finally:
        replies.close()


def test_telemetry_batches_survive_a_broker_outage_none_missing(
    models: ModelFiles, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("persistent-broker")
    with start_broker(work, extra_config=["persistence true", f"persistence_location {work}/"]) as broker:
        rig = Rig(tmp_path, models.path("mlp.onnx"), broker)
        config = rig.write_config("tel-1")
        config.write_text(config.read_text() + "[telemetry]\ninterval_s = 0.2\n")
        topic = device_topic("tel-1", "telemetry")
        collector = Subscriber(broker, [topic], "collector", persistent=True)
        agent = Agent(load_settings(config)).start()
        try:
            wait_for(lambda: len(collector.json(topic)) >= 3, 30, "telemetry")
            first = collector.json(topic)[0]
            assert {"seq", "ts", "models", "unattributed_errors", "queue_depth", "system", "update", "throughput_rps"} <= set(first)
            assert first["system"]["rss_bytes"] > 0
            broker.stop()
            time.sleep(2.0)  # ~10 batches go to the outbox
            assert agent.store.outbox_size() >= 5
            broker.start_again()
            seen_before = max(b["seq"] for b in collector.json(topic))
            wait_for(lambda: max(b["seq"] for b in collector.json(topic)) > seen_before + 12, 60, "the backlog and new batches")
        finally:
            agent.stop()
            collector.close()
        seqs = [b["seq"] for b in collector.json(topic)]
        assert sorted(set(seqs)) == list(range(1, max(seqs) + 1))  # none missing (a re-sent one would repeat its seq)
        assert all(b["dropped_total"] == 0 for b in collector.json(topic))


# what ``Windows.take`` gives for an agent serving nothing: the outbox tests' collect
EMPTY_WINDOW = {
    "device_id": "t",
    "session": 1,
    "models": [],
    "throughput_rps": 0.0,
    "queue_depth": 0,
    "system": {"cpu_percent": 0.0, "process_cpu_percent": 0.0, "rss_bytes": 1, "memory_percent": 1.0},
}


def test_outbox_limits_drop_the_oldest_and_say_so(tmp_path: Path) -> None:
    from agent.outbox import Outbox
    from agent.store import AgentStore

    store = AgentStore(tmp_path / "a.db")
    window = EMPTY_WINDOW
    t = Outbox(store, lambda _: window, lambda payload: None, lambda: False, max_batches=3)  # type: ignore[arg-type,return-value]
    for _ in range(5):
        t.record()
    kept = store.outbox_oldest()
    assert [seq for seq, _ in kept] == [3, 4, 5] and json.loads(kept[-1][1])["dropped_total"] == 1
    t.record()  # each batch says how many were dropped before it was made
    kept = store.outbox_oldest()
    assert [seq for seq, _ in kept] == [4, 5, 6] and json.loads(kept[-1][1])["dropped_total"] == 2


def test_outbox_batch_asked_for_soon_comes_soon_and_says_its_window(tmp_path: Path) -> None:
    """``report_soon``: the next batch within the delay (not at the interval's end, 60 s here), its ``interval_s`` the
    window it covers; a delay not shorter than the interval changes nothing; a window is never longer than the
    wire allows (a day)."""
    from agent.outbox import MAX_WINDOW_S, Outbox
    from agent.store import AgentStore

    store = AgentStore(tmp_path / "a.db")
    window = EMPTY_WINDOW
    asked: list[float] = []
    t = Outbox(store, lambda s: asked.append(s) or window, lambda payload: None, lambda: False, interval_s=60).start()  # type: ignore[arg-type,return-value,func-returns-value]
    try:
        t.report_soon(60.0)
        assert t._soon == float("inf")  # the interval's own batch comes no later: nothing to ask for
        t.report_soon(0.3)
        kept = wait_for(lambda: store.outbox_oldest(), 10, "the early batch")
        batch = json.loads(kept[0][1])
        assert batch["seq"] == 1 and 0.2 < batch["interval_s"] < 5 and asked == [batch["interval_s"]]
        t._window_start -= 3 * MAX_WINDOW_S  # as if the last batch were three days ago
        t.record()
        assert json.loads(store.outbox_oldest()[-1][1])["interval_s"] == MAX_WINDOW_S
    finally:
        t.stop(flush_timeout=0.1)


def test_systemd_notify_ready_watchdog_stopping(rig: Rig, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    config = rig.write_config("sd-1")
    agent = AgentProcess(config, tmp_path / "a.log", {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
    got: list[str] = []
    try:
        while sum(m.count("WATCHDOG=1") for m in got) < 3:
            got.append(sock.recv(4096).decode())
        assert "READY=1" in got[0] and "STATUS=" in got[0]
        agent.proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in got):
            got.append(sock.recv(4096).decode())
        assert agent.proc.wait(20) == 0
    finally:
        if agent.proc.poll() is None:
            agent.kill9()
        sock.close()


def test_sighup_reloads_settings_and_refuses_a_broken_file(rig: Rig, tmp_path: Path) -> None:
    config = rig.write_config("hup-1")
    agent = AgentProcess(config, tmp_path / "a.log")
    try:
        wait_for(lambda: "event=agent.connected" in agent.text(), 30, "connected")
        config.write_text(config.read_text().replace("[update]\n", "[update]\nkeep_versions = 4\n"))
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "event=agent.reloaded needs_restart=-" in agent.text(), 10, "reloaded")
        good = config.read_text()
        config.write_text(good + "[serving]\nqueue_size = -3\n")
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "event=agent.reload_refused" in agent.text(), 10, "refused")
        assert "serving.queue_size=-3" in agent.text()
        config.write_text(good + "[telemetry]\ninterval_s = 5\n")
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: agent.text().count("event=agent.reloaded") == 2, 10, "reloaded again")
        assert agent.proc.poll() is None
    finally:
        assert agent.stop() == 0


def test_config_check_prints_effective_settings_or_the_bad_key(tmp_path: Path) -> None:
    good = tmp_path / "agent.toml"
    good.write_text('device_id = "cfg-1"\n[serving]\nworkers = 3\n')
    cli = [sys.executable, "-m", "agent.cli", "config", "check", "--config"]
    done = subprocess.run(
        [*cli, str(good)], capture_output=True, text=True, timeout=60, env={**os.environ, "EDGEFLEET_BROKER__PORT": "8883"}
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["device_id"] == "cfg-1" and data["serving"]["workers"] == 3 and data["broker"]["port"] == 8883
    bad = tmp_path / "bad.toml"
    for text, expect in (
        ('device_id = "../x"\n', "device_id='../x'"),
        ("[broker]\nport = 99999\n", "broker.port=99999"),
        ("[telemetry]\nsurprise = 1\n", "telemetry.surprise=1"),
        ("this is not toml", "settings file"),
    ):
        bad.write_text(text)
        done = subprocess.run([*cli, str(bad)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and expect in done.stderr, (text, done.stderr)
