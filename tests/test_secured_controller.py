"""The controller on the broker `fleet provision --init` secures: TLS, passwords, the generated ACL, no anonymous listener.

Everything the controller does here it does with only the fleet.toml that provisioning wrote: `fleet serve` as a
process (repository server, ingest, rollouts, dashboard), `fleet assign`, `fleet devices`, `fleet simulate` with each
simulated device's own credentials, and a real agent on its provisioned files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import tomllib
from update_rig import MODEL, AgentProcess, Rig, wait_for

from agent.client import EdgeClient
from agent.settings import BrokerSettings, write_config
from fleet.dev.broker import RunningBroker, free_port, mosquitto_binary
from fleet.store import FleetStore

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="TLS and ACLs need mosquitto (amqtt has neither)")

SIMS = [f"sec-sim-{i:04d}" for i in range(3)]
FLEET = [sys.executable, "-m", "fleet.cli"]


def fleet(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FLEET, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def start_mosquitto(config: Path, port: int, workdir: Path) -> RunningBroker:
    """mosquitto on the generated config as it is, plus only where to log (and, as root, to stay root: mosquitto
    drops to its own user, which cannot read the 0700 broker directory — DESIGN.md)."""
    workdir.mkdir(parents=True, exist_ok=True)
    run = workdir / "mosquitto.conf"
    extra = [f"log_dest file {workdir / 'mosquitto.log'}", "persistence false", *(["user root"] if os.geteuid() == 0 else [])]
    run.write_text(config.read_text() + "\n".join(extra) + "\n")
    binary = mosquitto_binary()
    assert binary is not None
    proc = subprocess.Popen([binary, "-c", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    broker = RunningBroker("mosquitto", "127.0.0.1", port, workdir, run, proc)

    def listening() -> bool:
        assert proc.poll() is None, (workdir / "mosquitto.log").read_text(errors="replace")[-2000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    try:
        wait_for(listening, 15, "mosquitto listening")
    except AssertionError:
        broker.stop()
        raise
    return broker


@dataclass
class Secured:
    work: Path
    fleet_toml: Path
    broker_dir: Path
    broker: RunningBroker
    rig: Rig
    creds: Path  # {id}/ as `fleet provision ID --out` writes it


@pytest.fixture(scope="module")
def secured(models: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    work = tmp_path_factory.mktemp("secured")
    tls, mtls = free_port(), free_port()
    broker_dir, fleet_toml, creds = work / "broker", work / "fleet.toml", work / "creds"
    done = fleet(
        "provision",
        "--init",
        "--broker-dir",
        broker_dir,
        "--hostname",
        "127.0.0.1",
        "--broker",
        f"127.0.0.1:{tls}",
        "--mtls-port",
        mtls,
        "--config",
        fleet_toml,
    )
    assert done.returncode == 0, done.stderr
    for name, role in [("sec-agent", "device"), ("sec-app", "app"), *((s, "device") for s in SIMS)]:
        done = fleet("provision", name, "--broker-dir", broker_dir, "--role", role, "--out", creds / name, "--broker", f"127.0.0.1:{tls}")
        assert done.returncode == 0, done.stderr
    broker = start_mosquitto(broker_dir / "mosquitto.conf", tls, work / "mosquitto")
    try:
        rig = Rig(work / "fleetdata", models.path("mlp.onnx"), broker)  # not "fleet": `python -m fleet.cli` runs in work/
        for version in ("1.0.0", "1.1.0"):
            rig.release(version)
        yield Secured(work, fleet_toml, broker_dir, broker, rig, creds)
    finally:
        broker.stop()


def test_provision_init_writes_the_controllers_fleet_toml_and_credentials(secured: Secured) -> None:
    config = tomllib.loads(secured.fleet_toml.read_text())
    b = config["broker"]
    assert (b["host"], b["port"], b["username"]) == ("127.0.0.1", secured.broker.port, "edgefleet-controller")
    for key in ("password_file", "tls_ca", "tls_cert", "tls_key"):
        assert Path(b[key]).is_absolute() and Path(b[key]).is_file(), key
    for private in (secured.fleet_toml, Path(b["password_file"]), Path(b["tls_key"])):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    password = Path(b["password_file"]).read_text().strip()
    assert len(password) >= 24 and password not in secured.fleet_toml.read_text()  # the secret is only in its own file
    generated = (secured.broker_dir / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in generated and f"listener {secured.broker.port} " in generated
    again = fleet("provision", "--init", "--broker-dir", secured.work / "other", "--config", secured.fleet_toml)
    assert again.returncode != 0 and "already exists" in again.stderr and not (secured.work / "other").exists()


def test_the_secured_broker_refuses_anonymous_and_plain_clients(secured: Secured, tmp_path: Path) -> None:
    """What the controller is up against: without its TLS and credentials nothing gets in."""
    for tls in (False, True):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"anon-{tls}", protocol=mqtt.MQTTv5)
        if tls:
            c.tls_set(ca_certs=str(secured.broker_dir / "ca.pem"))
        codes: list[Any] = []
        answered = threading.Event()  # a CONNACK (refused, we expect) or the broker closing the connection

        def on_connect(
            cl: Any, u: Any, f: Any, reason: Any, p: Any, codes: list[Any] = codes, answered: threading.Event = answered
        ) -> None:
            codes.append(reason)
            answered.set()

        c.on_connect = on_connect
        c.on_disconnect = lambda *a, answered=answered: answered.set()
        try:
            c.connect(secured.broker.host, secured.broker.port)
            c.loop_start()
            assert answered.wait(15), "the broker neither answered nor closed the connection"
        except (OSError, ValueError):  # the TLS handshake itself refused: nothing got in either
            pass
        finally:
            c.disconnect()
            c.loop_stop()
        assert not [r for r in codes if not r.is_failure], (tls, codes)
    done = fleet("devices", "--broker", f"127.0.0.1:{secured.broker.port}", "--wait", "0.5", "--json", cwd=tmp_path)
    assert done.returncode == 1 and "error[unreachable]" in done.stderr, done.stderr  # built-in defaults (no TLS): not let in


def agent_config(secured: Secured, device: str) -> Path:
    """The provisioned agent.toml with its files where they lie here, plus a state dir and the rig's trusted roots."""
    files = secured.creds / device
    provisioned = tomllib.loads((files / "agent.toml").read_text().replace("/etc/edgefleet", str(files)))
    state = secured.work / "devices" / device
    return write_config(
        state / "agent.toml",
        {
            **provisioned,
            "state_dir": state,
            "update": {
                "image_root": secured.rig.image.metadata / "1.root.json",
                "director_root": secured.rig.director.directory / "1.root.json",
                "retry_s": 0.3,
                "request_timeout_s": 3.0,
            },
            "telemetry": {"interval_s": 0.5},
        },
    )


def test_fleet_serve_with_only_the_generated_fleet_toml_rolls_out_to_a_real_agent_and_simulated_devices(
    secured: Secured, tmp_path: Path
) -> None:
    rig, work = secured.rig, secured.work
    store = tmp_path / "fleet.db"
    serve_log = tmp_path / "serve.log"
    # in the folder of fleet.toml, without --config: ./fleet.toml is what it reads
    with open(serve_log, "wb") as log:
        serve = subprocess.Popen(
            [*FLEET, "serve", str(rig.serve), "--keys", str(rig.keys.directory), "--store", str(store), "--http", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=work,
        )
    agent = AgentProcess(agent_config(secured, "sec-agent"), tmp_path / "agent.log")
    sims: subprocess.Popen[bytes] | None = None
    try:
        url = wait_for(lambda: re.findall(r"dashboard on (http://\S+/)", serve_log.read_text()), 60, "the dashboard")[0]
        assert "with TLS" in wait_for(lambda: "serving" in serve_log.read_text() and serve_log.read_text(), 30, "serving")
        done = fleet(
            "assign",
            "sec-agent",
            MODEL,
            "1.0.0",
            "--variant",
            "onnx-fp32",
            "--repo",
            rig.image.directory,
            "--director",
            rig.director.directory,
            "--keys",
            rig.keys.directory,
            "--config",
            secured.fleet_toml,
        )
        assert done.returncode == 0, done.stderr
        wait_for(lambda: f"event=host.swapped model={MODEL} version=1.0.0" in agent.text(), 90, "the agent on 1.0.0 through TLS")
        sims = subprocess.Popen(
            [
                *FLEET,
                "simulate",
                str(len(SIMS)),
                "--prefix",
                "sec-sim",
                "--credentials",
                str(secured.creds),
                "--running",
                f"{MODEL}=1.0.0",
                "--telemetry",
                "0.5",
                "--config",
                str(secured.fleet_toml),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "sim.log", "wb"),  # the process owns it
        )

        def registered() -> list[dict[str, Any]]:
            out = fleet("devices", "--store", store, "--json").stdout
            return [d for d in json.loads(out or "[]") if d["device_id"].startswith("sec-") and d["models"]]

        wait_for(lambda: len(registered()) == 1 + len(SIMS), 60, "the agent and the simulated devices in the registry")
        on_broker = fleet("devices", "--config", secured.fleet_toml, "--wait", "1", "--json")  # the broker's view, over TLS
        assert on_broker.returncode == 0, on_broker.stderr
        assert {d["device_id"] for d in json.loads(on_broker.stdout) if d["online"]} >= {"sec-agent", *SIMS}

        # real inference through the ACL, as the provisioned application: the agent's telemetry then counts it
        app = BrokerSettings(
            host="127.0.0.1",
            port=secured.broker.port,
            username="sec-app",
            password_file=secured.creds / "sec-app" / "broker-password",
            tls_ca=secured.creds / "sec-app" / "fleet-ca.pem",
        )
        with EdgeClient(client_id="sec-app", broker=app) as client:
            x = np.random.default_rng(0).uniform(-1, 1, (1, 64)).astype(np.float32)
            for _ in range(5):
                assert client.infer("sec-agent", MODEL, x, timeout=20).version == "1.0.0"

        started = fleet(
            "rollout",
            "start",
            MODEL,
            "1.1.0",
            "--store",
            store,
            "--repo",
            rig.image.directory,
            "--select",
            "device=sec-*",
            "--waves",
            "1,all",
            "--soak",
            "1",
        )
        assert started.returncode == 0, started.stderr
        rid = int(started.stderr.split()[1].rstrip(":"))

        def state() -> dict[str, Any]:
            done = fleet("rollout", "status", str(rid), "--store", store, "--json")
            assert done.returncode == 0, done.stderr
            return dict(json.loads(done.stdout))

        wait_for(lambda: state()["state"] in ("done", "aborted"), 120, "the rollout to end")
        final = state()
        assert final["state"] == "done", final
        assert [sum(w.values()) for w in final["waves"]] == [1, len(SIMS)]
        wait_for(lambda: f"event=host.swapped model={MODEL} version=1.1.0" in agent.text(), 60, "the real agent on 1.1.0")
        everyone = dict.fromkeys(["sec-agent", *SIMS], "1.1.0")
        wait_for(lambda: {d["device_id"]: d["models"][MODEL]["version"] for d in registered()} == everyone, 30, "all on 1.1.0")

        fs = FleetStore(store)
        try:
            assert all(fs.recent_telemetry(d) for d in SIMS)
            answered = lambda: sum(t["requests"] for t in fs.recent_telemetry("sec-agent", 100) if t["version"] == "1.0.0")  # noqa: E731
            wait_for(lambda: answered() >= 5, 30, "the agent's telemetry of the 5 answered calls")
        finally:
            fs.close()

        with urllib.request.urlopen(url, timeout=10) as page:  # loopback: no token needed
            assert page.status == 200 and b"<html" in page.read().lower()
        with urllib.request.urlopen(url + "api/state", timeout=10) as api:
            shown = json.loads(api.read())
        assert {d["id"] for d in shown["devices"]} >= {"sec-agent", *SIMS}
        assert any(r["id"] == rid and r["state"] == "done" for r in shown["rollouts"])
        assert serve.poll() is None, serve_log.read_text()[-3000:]
    finally:
        if sims is not None:
            sims.send_signal(signal.SIGTERM)
            sims.wait(30)
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
        agent.stop()


def test_fleet_config_check_prints_the_settings_or_names_the_bad_key(secured: Secured, tmp_path: Path) -> None:
    done = fleet("config", "check", "--config", secured.fleet_toml, env={"EDGEFLEET_FLEET_BROKER__KEEPALIVE_S": "45"})
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["broker"]["username"] == "edgefleet-controller" and shown["broker"]["keepalive_s"] == 45  # the env overlay
    assert shown["broker"]["tls_ca"].endswith("fleet-ca.pem") and shown["store"] is None
    bad = tmp_path / "bad.toml"
    bad.write_text('[broker]\nhost = "b.example.net"\nprot = 8883\n')
    done = fleet("config", "check", "--config", bad)
    assert done.returncode == 2 and "broker.prot" in done.stderr and "Extra inputs are not permitted" in done.stderr, done.stderr
    done = fleet("config", "check", "--config", secured.fleet_toml, env={"EDGEFLEET_FLEET_BROKER__PORT": "many"})
    assert done.returncode == 2 and "broker.port='many'" in done.stderr, done.stderr
    bad.write_text('[dashboard]\nhttp = "everywhere"\n')
    done = fleet("config", "check", "--config", bad)
    assert done.returncode == 2 and "dashboard.http" in done.stderr, done.stderr
    done = fleet("config", "check", "--config", tmp_path / "missing.toml")
    assert done.returncode == 2 and "not found" in done.stderr
    # the same bad file stops every command that reads it, before it does anything
    done = fleet("devices", "--config", bad, "--json")
    assert done.returncode == 2 and "dashboard.http" in done.stderr
    # no fleet.toml in the working directory: the built-in defaults
    done = fleet("config", "check", cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["broker"]["host"] == "127.0.0.1"
