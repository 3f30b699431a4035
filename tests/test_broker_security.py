"""mosquitto with TLS, passwords and the ACL `fleet provision` generates: who may connect, read and publish."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from update_rig import wait_for

from agent.daemon import Agent
from agent.settings import load_settings
from agent.wire import device_topic
from fleet.dev.broker import RunningBroker, free_port, mosquitto_binary, start_broker
from fleet.provision import BrokerAuth, Credentials, device_bundle

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="TLS and ACLs need mosquitto (amqtt has neither)")


@dataclass
class Secure:
    auth: BrokerAuth
    broker: RunningBroker
    mtls_port: int
    creds: dict[str, Credentials]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    root = tmp_path_factory.mktemp("security")
    auth = BrokerAuth(root / "broker")
    auth.init(["127.0.0.1", "localhost"])
    creds = {n: auth.add(n) for n in ("dev-1", "dev-2")}
    creds["app-1"] = auth.add("app-1", "app")
    creds["ctl"] = auth.add("ctl", "controller")
    mtls = free_port()
    extra = [*auth.global_config(), *auth.listener_config(), f"listener {mtls} 127.0.0.1", *auth.listener_config(mutual_tls=True)]
    broker = start_broker(root / "mosquitto", extra_config=extra)
    yield Secure(auth, broker, mtls, creds)
    broker.stop()


class Conn:
    def __init__(
        self,
        s: Secure,
        who: str | None,
        password: str | None = None,
        mutual: bool = False,
        cert: Credentials | None = None,
        wait: float = 10,
    ) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.reason: Any = None
        self.suback: list[Any] = []
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{who or 'anon'}-{time.monotonic_ns() % 10**6}", protocol=mqtt.MQTTv5
        )
        c = cert or (s.creds[who] if who and mutual else None)
        self.c.tls_set(ca_certs=str(s.auth.ca_pem), certfile=str(c.cert) if c else None, keyfile=str(c.key) if c else None)
        if who and not mutual:
            self.c.username_pw_set(who, password if password is not None else s.creds[who].password)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda cl, u, mid, codes, props: self.suback.extend(codes)
        self.c.connect(s.broker.host, s.mtls_port if mutual else s.broker.port)
        self.c.loop_start()
        self.answered.wait(wait)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.reason = reason
        if not reason.is_failure:
            self.connected.set()
        self.answered.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def got(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.messages if t == topic]

    def sub(self, topic: str) -> Any:
        self.suback.clear()
        self.c.subscribe(topic, qos=1)
        wait_for(lambda: self.suback, 10, "SUBACK")
        return self.suback[0]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_a_device_connects_only_with_its_own_credentials(secure: Secure) -> None:
    ok = Conn(secure, "dev-1")
    assert ok.connected.is_set()
    ok.close()
    for who, password in (("dev-1", "wrong"), ("dev-1", secure.creds["dev-2"].password), ("nobody", "x")):
        bad = Conn(secure, who, password, wait=5)
        assert not bad.connected.is_set() and bad.reason is not None and bad.reason.is_failure, (who, bad.reason)
        bad.close()
    anonymous = Conn(secure, None, wait=3)
    assert not anonymous.connected.is_set()
    anonymous.close()


def test_plain_tcp_to_the_tls_listener_gets_nowhere(secure: Secure) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plain", protocol=mqtt.MQTTv5)
    c.username_pw_set("dev-1", secure.creds["dev-1"].password)  # right password, but it would travel in clear text
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect(secure.broker.host, secure.broker.port)
    c.loop_start()
    try:
        assert not connected.wait(3)
    finally:
        c.disconnect()
        c.loop_stop()


def test_the_acl_confines_each_device_to_its_own_tree(secure: Secure) -> None:
    dev1, dev2, app, ctl = Conn(secure, "dev-1"), Conn(secure, "dev-2"), Conn(secure, "app-1"), Conn(secure, "ctl")
    try:
        assert all(c.connected.is_set() for c in (dev1, dev2, app, ctl))
        # mosquitto 2.0 grants any subscription and checks the ACL on every delivery: what matters is what arrives
        dev1.sub(device_topic("dev-2", "infer", "#"))  # another device's inference inputs
        assert not dev1.sub(device_topic("dev-1", "infer", "#")).is_failure
        assert not dev2.sub(device_topic("dev-2", "infer", "#")).is_failure
        assert not ctl.sub("edgefleet/v1/dev/+/status").is_failure
        app.c.publish(device_topic("dev-2", "infer", "mlp", "app-1"), b"for dev-2", qos=1)
        app.c.publish(device_topic("dev-1", "infer", "mlp", "app-1"), b"for dev-1", qos=1)
        dev1.c.publish(device_topic("dev-2", "status"), b'{"state": "lost"}', qos=1)  # impersonation attempt
        dev1.c.publish(device_topic("dev-1", "status"), b'{"state": "ready"}', qos=1)  # its own: allowed
        dev1.sub(device_topic("dev-1", "cmd"))
        wait_for(
            lambda: dev1.got(device_topic("dev-1", "infer", "mlp", "app-1")) and ctl.got(device_topic("dev-1", "status")),
            10,
            "allowed traffic",
        )
        wait_for(lambda: dev2.got(device_topic("dev-2", "infer", "mlp", "app-1")), 10, "dev-2's own input")
        time.sleep(0.5)
        assert dev1.got(device_topic("dev-2", "infer", "mlp", "app-1")) == []
        assert ctl.got(device_topic("dev-2", "status")) == []
        app.sub(device_topic("dev-1", "cmd"))  # an application cannot read device commands
        ctl.c.publish(device_topic("dev-1", "cmd"), b'{"command": "ping"}', qos=1)
        wait_for(lambda: dev1.got(device_topic("dev-1", "cmd")), 10, "dev-1's command")
        time.sleep(0.3)
        assert app.got(device_topic("dev-1", "cmd")) == []
    finally:
        for c in (dev1, dev2, app, ctl):
            c.close()


def test_mutual_tls_takes_the_certificate_as_identity_and_refuses_strangers(secure: Secure, tmp_path: Path) -> None:
    good = Conn(secure, "dev-1", mutual=True)
    try:
        assert good.connected.is_set()
        good.sub(device_topic("dev-2", "infer", "#"))
        good.sub(device_topic("dev-1", "infer", "#"))
        sender = Conn(secure, "app-1")
        sender.c.publish(device_topic("dev-2", "infer", "m", "app-1"), b"x", qos=1)
        sender.c.publish(device_topic("dev-1", "infer", "m", "app-1"), b"y", qos=1)
        wait_for(lambda: good.got(device_topic("dev-1", "infer", "m", "app-1")), 10, "its own input")
        time.sleep(0.3)
        assert good.got(device_topic("dev-2", "infer", "m", "app-1")) == []  # the ACL applies to the certificate's CN
        sender.close()
    finally:
        good.close()
    stranger_ca = BrokerAuth(tmp_path / "other-fleet")
    stranger_ca.init(["127.0.0.1"])
    forged = stranger_ca.add("dev-1")  # same name, certificate from another CA
    for cert in (forged, None):
        try:  # TLS 1.2 fails in the handshake; with 1.3 the broker's alert comes after it and the session just dies
            stranger = Conn(secure, None, mutual=True, cert=cert, wait=3)
        except (ssl.SSLError, OSError):
            continue
        assert not stranger.connected.is_set()
        stranger.close()


def test_the_agent_runs_on_provisioned_credentials(secure: Secure, tmp_path: Path) -> None:
    creds = secure.auth.add("dev-9")
    files = device_bundle(creds, tmp_path / "etc", secure.broker.host, secure.broker.port)
    toml = (files / "agent.toml").read_text().replace("/etc/edgefleet", str(files))  # the files, where they lie here
    config = files / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n' + toml)
    secure.broker.process.send_signal(1)  # SIGHUP: mosquitto rereads the password file and ACL
    time.sleep(0.5)
    watch = Conn(secure, "ctl")
    watch.sub(device_topic("dev-9", "status"))
    agent = Agent(load_settings(config)).start()
    try:
        assert agent.wait_connected(15)
        wait_for(lambda: any(b'"ready"' in p for p in watch.got(device_topic("dev-9", "status"))), 15, "dev-9 ready")
    finally:
        agent.stop()
        watch.close()


def test_a_revoked_device_cannot_connect_after_the_broker_rereads(secure: Secure, tmp_path: Path) -> None:
    import subprocess
    import sys

    creds = secure.auth.add("dev-gone")
    secure.broker.process.send_signal(1)
    time.sleep(0.5)
    assert Conn(secure, "dev-gone", creds.password).connected.is_set()
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "provision", "dev-gone", "--broker-dir", str(secure.auth.directory), "--revoke"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    secure.broker.process.send_signal(1)  # SIGHUP: mosquitto rereads passwords and ACL
    time.sleep(0.5)
    assert not Conn(secure, "dev-gone", creds.password, wait=5).connected.is_set()


def test_a_device_may_ask_the_repository_only_in_its_own_name(secure: Secure) -> None:
    """Repository requests carry the device id in the topic; the ACL lets each device publish only its own."""
    from agent.wire import REPO_REQUESTS, repo_request_topic

    dev1, ctl = Conn(secure, "dev-1"), Conn(secure, "ctl")
    try:
        assert not ctl.sub(REPO_REQUESTS).is_failure
        dev1.c.publish(repo_request_topic("dev-2"), b'{"request_id": "spoofed", "path": "director/dev-2/metadata/1.root.json"}', qos=1)
        dev1.c.publish(repo_request_topic("dev-1"), b'{"request_id": "own", "path": "image/metadata/1.root.json"}', qos=1)
        wait_for(lambda: ctl.got(repo_request_topic("dev-1")), 10, "dev-1's own request")  # published after the spoofed one
        assert ctl.got(repo_request_topic("dev-2")) == []
    finally:
        dev1.close()
        ctl.close()


def test_the_generated_broker_refuses_oversized_messages(secure: Secure) -> None:
    """A 30 MB retained `reported` once took the controller from 13 % to 88 % CPU: the broker now drops the sender."""
    from fleet.provision import MESSAGE_SIZE_LIMIT

    dev1, ctl = Conn(secure, "dev-1"), Conn(secure, "ctl")
    try:
        assert not ctl.sub(device_topic("dev-1", "#")).is_failure
        dropped = threading.Event()
        dev1.c.on_disconnect = lambda *a: dropped.set()
        dev1.c.publish(device_topic("dev-1", "reported"), b"x" * (MESSAGE_SIZE_LIMIT + 1), qos=1, retain=True)
        assert dropped.wait(10), "the oversized sender was not dropped"
        fine = Conn(secure, "dev-1")
        try:
            fine.c.publish(device_topic("dev-1", "status"), b'{"state": "ready", "session": 1}', qos=1)
            wait_for(lambda: ctl.got(device_topic("dev-1", "status")), 10, "a normal message after it")
            assert ctl.got(device_topic("dev-1", "reported")) == []  # published before the normal one: never delivered
        finally:
            fine.close()
    finally:
        dev1.close()
        ctl.close()


def test_an_application_may_send_inference_requests_only_under_its_own_name(secure: Secure) -> None:
    """The device limits each client's rate by the name in the request topic: the ACL makes that name the sender's."""
    dev1, app = Conn(secure, "dev-1"), Conn(secure, "app-1")
    try:
        assert not dev1.sub(device_topic("dev-1", "infer", "#")).is_failure
        app.c.publish(device_topic("dev-1", "infer", "m", "app-2"), b"posing as app-2", qos=1)
        app.c.publish(device_topic("dev-1", "infer", "m"), b"anonymous", qos=1)
        app.c.publish(device_topic("dev-1", "infer", "m", "app-1"), b"its own", qos=1)
        wait_for(lambda: dev1.got(device_topic("dev-1", "infer", "m", "app-1")), 10, "its own request")  # published last
        assert dev1.got(device_topic("dev-1", "infer", "m", "app-2")) == [] and dev1.got(device_topic("dev-1", "infer", "m")) == []
    finally:
        dev1.close()
        app.close()
