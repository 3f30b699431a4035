"""The broker fixture later issues build on: real brokers, real MQTT round trips."""

from __future__ import annotations

import os
import queue
import socket
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fleet.dev.broker import BrokerStartError, RunningBroker, mosquitto_binary, start_broker


def roundtrip(host: str, port: int, topic: str = "edgefleet/v1/test", payload: bytes = b"hello") -> bytes:
    got: queue.Queue[bytes] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_message = lambda c, u, m: got.put(m.payload)
    client.connect(host, port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)
        return got.get(timeout=5)
    finally:
        client.loop_stop()
        client.disconnect()


def test_session_broker_round_trip(mqtt_broker: RunningBroker) -> None:
    assert mqtt_broker.alive()
    assert roundtrip(mqtt_broker.host, mqtt_broker.port) == b"hello"


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed on this machine")
def test_mosquitto_config_and_stop_by_pid(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, prefer="mosquitto")
    assert broker.kind == "mosquitto"
    text = broker.config.read_text()
    assert f"listener {broker.port} 127.0.0.1" in text and "set_tcp_nodelay true" in text
    assert roundtrip(broker.host, broker.port, payload=b"x" * 100_000) == b"x" * 100_000
    pid = broker.pid
    broker.stop()
    assert not broker.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError):
        socket.create_connection((broker.host, broker.port), timeout=0.5)


def test_amqtt_fallback_round_trip(tmp_path: Path) -> None:
    with start_broker(tmp_path, prefer="amqtt") as broker:
        assert broker.kind == "amqtt"
        assert roundtrip(broker.host, broker.port) == b"hello"


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed on this machine")
def test_restart_on_same_port(tmp_path: Path) -> None:
    with start_broker(tmp_path) as broker:
        port, first_pid = broker.port, broker.pid
        broker.start_again()
        assert broker.port == port and broker.pid != first_pid
        assert roundtrip(broker.host, broker.port) == b"hello"


def test_bad_config_fails_with_log(tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        with pytest.raises(BrokerStartError, match="need mosquitto"):
            start_broker(tmp_path, extra_config=["no_such_option 1"])
    else:
        with pytest.raises(BrokerStartError, match="exited"):
            start_broker(tmp_path, port=None, extra_config=["no_such_option 1"], timeout=5)


def test_free_ports_are_never_ones_a_client_connection_can_take() -> None:
    """A port from the kernel's ephemeral range can be taken by any outgoing connection between free_port() and the
    server's bind; free_port hands out ports below that range, each free when handed out."""
    from fleet.dev.broker import LISTEN_PORTS_FROM, _bindable, _ephemeral_low, free_port

    low = _ephemeral_low()
    handed = [free_port() for _ in range(20)]
    ports = set(handed)
    if low > LISTEN_PORTS_FROM + 1000:  # else (a range from 1024, as some containers have) the kernel's choice
        assert all(p < low for p in ports), (low, sorted(ports))
    assert len(ports) == len(handed)  # never the same port twice
    if socket.has_ipv6:  # a server on the IPv6 loopback alone: a "localhost" client may reach it, so the port is taken
        port = free_port()
        with socket.socket(socket.AF_INET6) as v6:
            try:
                v6.bind(("::1", port))
            except OSError:
                pass  # no IPv6 loopback on this machine
            else:
                v6.listen()
                assert not _bindable("127.0.0.1", port)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free indeed
