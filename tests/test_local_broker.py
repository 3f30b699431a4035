"""``[serving.broker]``: inference on a device-local broker, everything else on the fleet's — two real mosquittos."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from update_rig import MODEL, Rig, Subscriber, wait_for

from agent.client import EdgeClient
from agent.daemon import Agent
from agent.settings import load_settings
from agent.wire import device_topic
from fleet.dev.broker import RunningBroker, start_broker

DEVICE = "site-1"


@pytest.fixture
def local_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """The device's own mosquitto (no persistence: a restart forgets every session, as a power cycle would)."""
    broker = start_broker(tmp_path_factory.mktemp("local-broker"), prefer="mosquitto")
    yield broker
    broker.stop()


def served_calls(telemetry: list[dict[str, object]]) -> int:
    return sum(int(m["count"]) for b in telemetry for m in b["models"])  # type: ignore[attr-defined,index]


def test_inference_on_the_local_broker_presence_updates_and_telemetry_on_the_fleets(
    rig: Rig, mqtt_broker: RunningBroker, local_broker: RunningBroker, tmp_path: Path
) -> None:
    assert local_broker.port != mqtt_broker.port
    config = rig.write_config(DEVICE)
    config.write_text(
        config.read_text() + f'[serving.broker]\nhost = "{local_broker.host}"\nport = {local_broker.port}\n[telemetry]\ninterval_s = 0.3\n'
    )
    settings = load_settings(config)
    assert settings.serving.broker is not None and settings.serving.broker.port == local_broker.port
    on_fleet = Subscriber(mqtt_broker, [device_topic(DEVICE, "#")], "watch-fleet")
    on_local = Subscriber(local_broker, ["#"], "watch-local")
    agent = Agent(settings).start()
    try:
        assert agent.wait_connected()
        rig.assign(DEVICE, "1.0.0")  # the update comes over the fleet's broker
        wait_for(lambda: agent.host.get(MODEL) is not None, what="the model installed")
        x = np.random.default_rng(0).uniform(-1, 1, (2, 64)).astype(np.float32)
        with EdgeClient(local_broker.host, local_broker.port) as app:
            for _ in range(20):
                assert app.infer(DEVICE, MODEL, {"x": x}).version == "1.0.0"
        # a request on the fleet's broker is not the device's to take any more: nobody answers it
        stray = json.dumps({"request_id": "stray", "inputs": {"x": x.tolist()}}).encode()
        on_fleet.client.publish(device_topic(DEVICE, "infer", MODEL), stray, qos=1)
        telemetry = device_topic(DEVICE, "telemetry")
        # the local calls are counted in telemetry on the fleet's broker; two more windows after that, so the stray
        # request would have been counted by now had it been taken
        wait_for(lambda: served_calls(on_fleet.json(telemetry)) >= 20, 30, "telemetry of the local calls")
        windows = len(on_fleet.json(telemetry))
        wait_for(lambda: len(on_fleet.json(telemetry)) > windows + 2, 30, "two more telemetry windows")
        assert served_calls(on_fleet.json(telemetry)) == 20
        fleet_topics = {t for t, _ in on_fleet.messages}
        assert not any("/pred/" in t for t in fleet_topics), fleet_topics  # nothing answered on the fleet's broker
        assert [t for t, _ in on_fleet.messages if "/infer/" in t] == [device_topic(DEVICE, "infer", MODEL)]  # only our stray one
        local_kinds = {t.split("/")[4] for t, _ in on_local.messages}
        assert local_kinds == {"infer", "pred"}, local_kinds  # no presence, telemetry or update traffic on the local broker

        # the local broker dies (kill -9): serving waits for it, the fleet's side goes on — an update installs meanwhile
        os.kill(local_broker.pid, signal.SIGKILL)
        local_broker.process.wait(10)
        wait_for(lambda: not agent.serving_session.is_connected(), 30, "the serving connection to notice")  # type: ignore[union-attr]
        rig.release("1.1.0")
        rig.assign(DEVICE, "1.1.0")
        wait_for(lambda: (m := agent.host.get(MODEL)) is not None and m.version == "1.1.0", 60, "the update while the local broker is down")
        assert agent.session.is_connected()
        local_broker.start_again()
        on_local.close()
        assert agent.wait_connected(60)  # the serving session reconnected and subscribed again (the broker forgot it)
        with EdgeClient(local_broker.host, local_broker.port) as app:
            assert app.infer(DEVICE, MODEL, {"x": x}, timeout=30).version == "1.1.0"
        states = [s["state"] for s in on_fleet.json(device_topic(DEVICE, "status"))]
        assert states and set(states) == {"ready"}, states  # the local outage never touched the device's presence
    finally:
        agent.stop()
        on_fleet.close()
    assert "lost" not in {s["state"] for s in on_fleet.json(device_topic(DEVICE, "status"))}
