"""A real agent under floods a confined peer can send: director hints and commands. Bounded work, every thread alive."""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt
from update_rig import MODEL, Rig, Subscriber, wait_for

from agent.daemon import EVENT_QUEUE, Agent
from agent.settings import load_settings
from agent.wire import device_topic


def serving(agent: Agent, version: str) -> bool:
    m = agent.host.get(MODEL)
    return m is not None and m.version == version


def flooder(rig: Rig, name: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
    c.connect(rig.broker.host, rig.broker.port)
    c.loop_start()
    return c


def test_500_director_messages_make_a_few_update_rounds(rig: Rig) -> None:
    rig.assign("flood-dir", "1.0.0")
    agent = Agent(load_settings(rig.write_config("flood-dir"), update={"min_check_interval_s": 2.0})).start()
    c = flooder(rig, "dir-flooder")
    try:
        wait_for(lambda: serving(agent, "1.0.0"), 60, "serving 1.0.0")
        wait_for(lambda: not agent._check_requested.is_set(), 30, "the first rounds done")
        before, started = agent.update_rounds, time.monotonic()
        for i in range(500):  # ~5 s of hints, 100 a second
            c.publish(device_topic("flood-dir", "director", "timestamp"), json.dumps({"hint": i}).encode(), qos=0)
            time.sleep(0.01)  # pacing the flood over seconds, as a peer would: not a wait for a condition
        elapsed = time.monotonic() - started
        wait_for(lambda: not agent._check_requested.is_set() and agent._events.empty(), 30, "the flood worked off")
        rounds = agent.update_rounds - before
        assert 1 <= rounds <= elapsed / 2.0 + 2, (rounds, elapsed)  # before: one round (a connection, two refreshes) each
        assert agent.network_alive() and serving(agent, "1.0.0")
    finally:
        c.loop_stop()
        c.disconnect()
        agent.stop()


def test_a_command_flood_is_answered_or_refused_never_queued_without_bound(rig: Rig) -> None:
    settings = load_settings(rig.write_config("flood-cmd"), update={"request_timeout_s": 2.0})
    agent = Agent(settings).start()
    replies = Subscriber(rig.broker, [device_topic("flood-cmd", "cmd", "reply")], "cmd-replies")
    c = flooder(rig, "cmd-flooder")
    try:
        assert agent.wait_connected(30)
        wait_for(lambda: not agent._check_requested.is_set() and agent._events.empty(), 30, "the first round done")
        rig.controller.server.stop()  # the next update round waits on an unreachable repository: the worker is busy
        busy_from = agent.update_rounds
        c.publish(device_topic("flood-cmd", "director", "timestamp"), b"{}", qos=1).wait_for_publish(5)
        wait_for(lambda: agent.update_rounds > busy_from, 10, "the worker in its round")
        n = 300
        for i in range(n):
            c.publish(device_topic("flood-cmd", "cmd"), json.dumps({"request_id": f"c{i}", "command": "ping"}).encode(), qos=1)
        wait_for(lambda: len(replies.json()) >= n, 60, "every command answered")
        answers = replies.json()
        refused = [r for r in answers if not r.get("ok")]
        assert {(r.get("ok"), (r.get("error") or {}).get("code")) for r in answers} == {(True, None), (False, "overloaded")}
        assert len(answers) - len(refused) <= EVENT_QUEUE + 1  # what waited was bounded; the rest was told at once
        assert agent.dropped_events.get("cmd", 0) == len(refused) and agent.network_alive()
    finally:
        rig.controller.server.start()
        c.loop_stop()
        c.disconnect()
        replies.close()
        agent.stop()
