"""`fleet serve` as a process against a peer's bombs on every topic it reads; it answers afterwards, also after a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
from tuf.api import exceptions as tuf_errors
from update_rig import Rig, wait_for

from agent.update.fetch import MqttFetcher
from agent.wire import device_topic, repo_request_topic
from fleet.dev.broker import start_broker
from fleet.store import FleetStore

BOMBS = [
    b"[" * 4000 + b"]" * 4000,  # json: RecursionError, which once ended paho's thread for good
    b'{"a": ' * 4000 + b"1" + b"}" * 4000,
    ('["\\"",' + "[" * 900 + "]" * 900 + ',"\\""]').encode("utf-16-le"),  # what json.loads(bytes) reads as UTF-16
    b'"' + b'\\"' * 20000,  # an unterminated string of escapes (a backtracking depth scan took minutes)
    b"\xff\xfe\x00garbage",
    b"x" * 300_000,
]


def fetch_timestamp(host: str, port: int, who: str) -> bytes | None:
    try:
        fetcher = MqttFetcher(host, port, who, "repo://", timeout=3, retries=1)
    except ConnectionError:
        return None
    try:
        return b"".join(fetcher.fetch("repo://image/metadata/timestamp.json"))
    except (tuf_errors.DownloadError, OSError):
        return None
    finally:
        fetcher.close()


def test_fleet_serve_keeps_serving_and_ingesting_after_every_bomb(rig: Rig, tmp_path: Path) -> None:
    store_path = tmp_path / "fleet.db"
    with start_broker(tmp_path / "broker") as broker:  # private: only this controller answers here
        cmd = [sys.executable, "-m", "fleet.cli", "serve", str(rig.serve), "--keys", str(rig.keys.directory)]
        cmd += ["--broker", f"{broker.host}:{broker.port}", "--store", str(store_path)]
        log = open(tmp_path / "serve.log", "ab")  # closed below
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        attacker = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bomber")
        attacker.connect(broker.host, broker.port)
        attacker.loop_start()
        store = None
        try:
            wait_for(lambda: fetch_timestamp(broker.host, broker.port, "probe-0"), 60, "fleet serve answering")
            topics = [
                repo_request_topic("bomber"),
                device_topic("bomber", "telemetry"),
                device_topic("bomber", "status"),
                device_topic("bomber", "jobs", "j1"),
                device_topic("bomber", "reported"),
            ]
            for topic in topics:
                for bomb in BOMBS:
                    attacker.publish(topic, bomb, qos=1, retain=topic.endswith("reported")).wait_for_publish(10)
            for round_ in range(2):  # and again after a restart, with a bomb retained on `reported`
                ready = json.dumps({"state": "ready", "session": 1}).encode()
                attacker.publish(device_topic(f"after-{round_}", "status"), ready, qos=1).wait_for_publish(10)
                assert fetch_timestamp(broker.host, broker.port, f"probe-{round_ + 1}"), "the repository server stopped answering"
                store = reader = store or FleetStore(store_path)
                wait_for(lambda r=round_, s=reader: (d := s.device(f"after-{r}")) is not None and d.online, 30, "ingest still storing")
                assert proc.poll() is None and store.device("bomber") is None  # nothing of the bombs was stored
                if round_ == 0:
                    proc.terminate()
                    assert proc.wait(30) == 0
                    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
                    wait_for(lambda: fetch_timestamp(broker.host, broker.port, "probe-r"), 60, "fleet serve back")
            assert "ingest.bad_message" in (tmp_path / "serve.log").read_text()
        finally:
            attacker.loop_stop()
            attacker.disconnect()
            proc.terminate()
            proc.wait(30)
            log.close()
            if store is not None:
                store.close()
