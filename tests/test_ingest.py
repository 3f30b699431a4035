"""The ingest on a real mosquitto: how it batches against the broker's in-flight window, acknowledges what it stored in
one write, and takes hostile messages among good ones."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from update_rig import wait_for

from agent import wire
from agent.wire import device_topic
from fleet.dev.broker import RunningBroker, start_broker
from fleet.store import FleetStore
from fleet.transport import client as transport
from fleet.transport.ingest import Ingestor

WINDOW = 10  # the broker's in-flight window per client: unacknowledged QoS 1 messages it sends before waiting


@pytest.fixture
def small_window(tmp_path: Path) -> Iterator[RunningBroker]:
    broker = start_broker(tmp_path / "broker", extra_config=[f"max_inflight_messages {WINDOW}", "max_queued_messages 0"])
    yield broker
    broker.stop()


def _batch(device: str, seq: int) -> bytes:
    system = wire.SystemMetrics(cpu_percent=1.0, process_cpu_percent=1.0, rss_bytes=1, memory_percent=1.0)
    body = wire.TelemetryBatch(
        device_id=device,
        session=1,
        seq=seq,
        ts=time.time(),
        interval_s=1.0,
        dropped_total=0,
        models=[wire.ModelWindow(model="m", version="1.0.0", count=1)],
        throughput_rps=1.0,
        queue_depth=0,
        system=system,
    )
    return wire.encode(body)


def _publisher(broker: RunningBroker, name: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def test_the_ingest_writes_when_the_brokers_window_is_full_not_after_flush_s(small_window: RunningBroker, tmp_path: Path) -> None:
    """The broker sends at most ``WINDOW`` unacknowledged messages and then waits for acknowledgements, which come
    only after the write: the writer stores as soon as the stream pauses, so 300 batches are all stored long before
    one ``flush_s`` (60 s) has passed, each once (a writer waiting out ``flush_s`` stored nothing for 60 s)."""
    store = FleetStore(tmp_path / "fleet.db")
    ingest = Ingestor(store, small_window.host, small_window.port, client_id="ingest-window", flush_s=60.0).start()
    pub = _publisher(small_window, "window-pub")
    try:
        for i in range(300):
            pub.publish(device_topic(f"w-{i % 10}", "telemetry"), _batch(f"w-{i % 10}", i // 10 + 1), qos=1)
        wait_for(lambda: store.telemetry_count() >= 300, 30, "every batch stored within one flush_s")
        ingest.wait_idle()
        assert store.telemetry_count() == 300 and store.duplicates == 0
        assert ingest.counters["stored"] == 300
    finally:
        pub.loop_stop()
        pub.disconnect()
        ingest.stop()
        store.close()


def test_hostile_messages_among_good_ones_are_counted_and_the_good_ones_stored(small_window: RunningBroker, tmp_path: Path) -> None:
    """Malformed, oversized, deeply nested and misaddressed telemetry between good batches: each bad one is a typed
    refusal counted in ``bad`` (and acknowledged: the broker does not send it again), every good one is stored."""
    store = FleetStore(tmp_path / "fleet.db")
    ingest = Ingestor(store, small_window.host, small_window.port, client_id="ingest-hostile", flush_s=60.0).start()
    pub = _publisher(small_window, "hostile-pub")
    hostile = [b"{not json", b"[" * 5000 + b"]" * 5000, b"x" * (wire.TelemetryBatch.MAX_BYTES + 1), _batch("someone-else", 1), b"\xff\xfe"]
    try:
        for i in range(50):
            pub.publish(device_topic("h-1", "telemetry"), _batch("h-1", i + 1), qos=1)
            if i % 10 == 0:
                pub.publish(device_topic("h-1", "telemetry"), hostile[i // 10], qos=1)
        wait_for(lambda: store.telemetry_count() >= 50 and ingest.counters["bad"] >= len(hostile), 30, "all seen")
        assert ingest.counters["bad"] == len(hostile) and ingest.alive()
        assert store.telemetry_count() == 50
    finally:
        pub.loop_stop()
        pub.disconnect()
        ingest.stop()
        store.close()


def test_acknowledgements_in_one_write_are_the_brokers(small_window: RunningBroker) -> None:
    """``ack_all`` acknowledges the messages it is given and no others: a persistent session that received 40 and
    acknowledged 25 of them (in one write) gets the other 15 again when it comes back, and only those."""
    received: list[tuple[int, int, bytes]] = []

    def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        received.append((msg.mid, msg.qos, bytes(msg.payload)))

    def session() -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="acker", protocol=mqtt.MQTTv5)
        c.manual_ack_set(True)
        c.on_message = on_message
        props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        c.connect(small_window.host, small_window.port, clean_start=False, properties=props)
        c.loop_start()
        return c

    sub = session()
    sub.subscribe("acks/#", qos=1)
    wait_for(lambda: sub.is_connected(), 10, "connected")
    pub = _publisher(small_window, "ack-pub")
    try:
        for i in range(WINDOW * 4):
            pub.publish(f"acks/{i}", json.dumps(i).encode(), qos=1)
        acked = 0
        while acked < 25:  # the window: the broker sends more as the first ones are acknowledged
            before = acked
            wait_for(lambda: len(received) > before, 10, "more messages")  # noqa: B023 (called here, in this round)
            take = received[acked:25]
            transport.ack_all(sub, [(mid, qos) for mid, qos, _ in take])
            acked += len(take)
        wait_for(lambda: len(received) >= 25 + WINDOW, 10, "the window after the acknowledged ones")
        sub.disconnect()
        sub.loop_stop()
        received.clear()
        sub = session()
        wait_for(lambda: len(received) >= 15, 10, "the unacknowledged ones again")
        transport.ack_all(sub, [(mid, qos) for mid, qos, _ in received])
        assert sorted(json.loads(p) for _, _, p in received) == list(range(25, 40))
    finally:
        pub.loop_stop()
        pub.disconnect()
        sub.disconnect()
        sub.loop_stop()


def test_a_read_ahead_client_gets_every_message_whole_and_in_order_again_after_a_reconnect(small_window: RunningBroker) -> None:
    """Packets of every size, many to one read and one over several (200 KB > ``READ_AHEAD``), each arrive whole and in
    order; and again on a new connection (which reads only its own socket's bytes)."""
    got: list[bytes] = []
    subscribed = threading.Event()
    c = transport.client(transport.broker_settings(small_window.host, small_window.port), "read-ahead", kind=transport.ReadAheadClient)
    c.on_message = lambda client, userdata, msg: got.append(bytes(msg.payload))
    c.on_connect = lambda client, userdata, flags, reason, properties: client.subscribe("ahead/#", qos=1)
    c.on_subscribe = lambda *a: subscribed.set()
    pub = _publisher(small_window, "ahead-pub")
    sizes = [1, 2, 127, 128, 16_383, 16_384, 200_000, *range(300, 700, 7)] * 3
    sent = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    try:
        for _ in range(2):
            got.clear()
            subscribed.clear()
            c.connect(small_window.host, small_window.port)
            c.loop_start()
            assert subscribed.wait(10)
            for body in sent:
                pub.publish("ahead/x", body, qos=1)
            wait_for(lambda: len(got) >= len(sent), 30, "every message")
            assert got == sent
            c.loop_stop()
            c.disconnect()
    finally:
        pub.loop_stop()
        pub.disconnect()
        c.loop_stop()
