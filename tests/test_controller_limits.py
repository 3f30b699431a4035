"""The controller against floods on a real broker: ghost device ids, and its own health when a network thread is gone."""

from __future__ import annotations

import json
from pathlib import Path

import paho.mqtt.client as mqtt
from update_rig import Rig, wait_for

from agent.wire import device_topic
from fleet.controller import Controller
from fleet.dev.broker import start_broker
from fleet.store import FleetStore
from fleet.transport.ingest import Ingestor


def test_ghost_device_ids_register_only_within_the_budget(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "broker")  # a private one: no other test's retained devices use the budget
    store = FleetStore(tmp_path / "fleet.db")
    ingest = Ingestor(store, broker.host, broker.port, client_id="ingest-ghosts", new_devices_per_minute=50).start()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ghost-maker")
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        ready = json.dumps({"state": "ready", "session": 1}).encode()
        for i in range(300):  # what one anonymous client sent: 20,000 ids in 5.5 s
            c.publish(device_topic(f"ghost-{i}", "status"), ready, qos=1)
        wait_for(lambda: ingest.counters["registered"] + ingest.counters["unregistered"] >= 300, 30, "every ghost seen")
        ingest.wait_idle()
        assert ingest.counters["registered"] == 50 and ingest.counters["unregistered"] == 250
        assert len([d for d in store.devices() if d.id.startswith("ghost-")]) == 50
        known = next(d.id for d in store.devices() if d.id.startswith("ghost-"))
        c.publish(device_topic(known, "status"), json.dumps({"state": "disconnected", "session": 1}).encode(), qos=1)
        wait_for(lambda: (d := store.device(known)) is not None and not d.online, 10, "a registered device still heard")
    finally:
        c.loop_stop()
        c.disconnect()
        ingest.stop()
        store.close()
        broker.stop()


def test_the_controller_is_unhealthy_when_a_network_thread_is_gone(rig: Rig, tmp_path: Path) -> None:
    controller = Controller(rig.serve, rig.keys, rig.broker.host, rig.broker.port, store=tmp_path / "fleet.db").start()
    try:
        assert controller.healthy()
        assert controller.ingest is not None
        controller.ingest._client.loop_stop()  # what paho does to its thread when a callback raises: it is gone
        assert not controller.healthy()
    finally:
        controller.stop()
