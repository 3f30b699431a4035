"""The read-ahead MQTT client every agent and controller connection uses (``agent.mqtt.ReadAheadClient``), against a real
mosquitto and an unmodified paho publisher: whatever the fast path decodes arrives exactly as stock paho would give it,
what it leaves to paho (properties, QoS 2, an empty topic) still arrives whole, and ``ack_many`` acknowledges exactly
the messages it names — a message not named is sent again to the resumed session."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt import ReadAheadClient, protocol_of
from agent.settings import BrokerSettings
from fleet.dev.broker import RunningBroker, start_broker
from fleet.transport import client as transport

VERSIONS = ["5", "3.1.1"]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """Room for every unacknowledged message in flight at once (mosquitto's default is 20)."""
    b = start_broker(tmp_path_factory.mktemp("mqtt-client"), extra_config=["max_inflight_messages 0", "max_queued_messages 0"])
    yield b
    b.stop()


Received = tuple[str, bytes, int, bool, dict[str, Any] | None]


def _seen(msg: mqtt.MQTTMessage) -> Received:
    props = msg.properties.json() if msg.properties is not None else None
    return msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), props


def _receiver(
    broker: RunningBroker, version: str, client_id: str, persistent: bool = False, manual: bool = False
) -> tuple[ReadAheadClient, queue.Queue[mqtt.MQTTMessage]]:
    settings = BrokerSettings(host=broker.host, port=broker.port, mqtt_version=version)  # type: ignore[arg-type]
    c = transport.client(settings, client_id, persistent=persistent)
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    c.on_message = lambda client, userdata, msg: got.put(msg)
    c.on_subscribe = lambda *a: subscribed.set()
    c.manual_ack_set(manual)
    transport.connect(c, settings, persistent=persistent, resume=persistent)
    c.loop_start()
    c.subscribe(f"t/{client_id}/#", qos=2)
    assert subscribed.wait(10), "no SUBACK"
    return c, got


def _publisher(broker: RunningBroker, version: str) -> mqtt.Client:
    p = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol_of(version))
    p.max_inflight_messages_set(0)
    p.connect(broker.host, broker.port)
    p.loop_start()
    return p


def _stock_sink(broker: RunningBroker, version: str, topics: str, qos: int) -> tuple[mqtt.Client, queue.Queue[mqtt.MQTTMessage]]:
    """A stock paho client subscribed to ``topics``, and the queue its messages go to."""
    sink: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    stock = _publisher(broker, version)
    stock.on_message = lambda c, u, m: sink.put(m)
    subscribed = threading.Event()
    stock.on_subscribe = lambda *a: subscribed.set()
    stock.subscribe(topics, qos=qos)
    assert subscribed.wait(10), "no SUBACK"
    return stock, sink


def _connect_subscribed(client: mqtt.Client, settings: BrokerSettings, topic: str, qos: int) -> None:
    """Connect ``client``, start its loop, subscribe it to ``topic`` and wait for the SUBACK."""
    ready = threading.Event()
    client.on_subscribe = lambda *a: ready.set()
    transport.connect(client, settings)
    client.loop_start()
    client.subscribe(topic, qos=qos)
    assert ready.wait(10), "no SUBACK"


def _props(**values: Any) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(p, name, value)
    return p


def _take(got: queue.Queue[mqtt.MQTTMessage], n: int, timeout: float = 20.0) -> list[mqtt.MQTTMessage]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        out.append(got.get(timeout=max(0.01, deadline - time.monotonic())))
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_a_burst_of_every_kind_arrives_as_sent(broker: RunningBroker, version: str) -> None:
    """Thousands of small messages read many to a ``recv``, one larger than the read-ahead (it spans several reads),
    QoS 0, 1 and 2, MQTT 5 properties, an empty payload, a retained message delivered at subscription."""
    cid = f"burst-{version}"
    publisher = _publisher(broker, version)
    publisher.publish(f"t/{cid}/retained", b"kept", qos=1, retain=True).wait_for_publish(10)
    receiver, got = _receiver(broker, version, cid)
    v5 = version == "5"
    sent: list[Received] = [(f"t/{cid}/retained", b"kept", 1, True, {} if v5 else None)]
    try:
        infos = []
        for i in range(3000):
            topic, payload, qos = f"t/{cid}/small/{i % 7}", os.urandom(i % 300), (0, 1, 2)[i % 3]
            props = None
            if v5 and i % 50 == 0:
                props = _props(ResponseTopic=f"reply/{i}", CorrelationData=i.to_bytes(4, "big"), UserProperty=[("k", str(i))])
            infos.append(publisher.publish(topic, payload, qos=qos, properties=props))
            sent.append((topic, payload, qos, False, (props.json() if props else {}) if v5 else None))
        big = os.urandom(3 * ReadAheadClient.READ_AHEAD + 17)
        infos.append(publisher.publish(f"t/{cid}/big", big, qos=1))
        sent.append((f"t/{cid}/big", big, 1, False, {} if v5 else None))
        for info in infos:
            info.wait_for_publish(10)
        messages = _take(got, len(sent))
        received = [_seen(m) for m in messages]
        assert sorted(received, key=repr) == sorted(sent, key=repr)
        in_order = [r for r in received if r[0] == f"t/{cid}/small/0" and r[2] == 1]  # MQTT orders one topic's QoS 1
        assert in_order == [s for s in sent if s[0] == f"t/{cid}/small/0" and s[2] == 1], "one topic's messages out of order"
        assert got.empty()
        if v5:  # a message without properties still has its (empty) Properties, of its own
            plain = [m.properties for m in messages if m.topic.endswith("/big")]
            assert isinstance(plain[0], Properties) and plain[0].json() == {}
            assert len({id(m.properties) for m in messages}) == len(messages)
    finally:
        publisher.publish(f"t/{cid}/retained", b"", retain=True).wait_for_publish(10)
        for c in (receiver, publisher):
            c.loop_stop()
            c.disconnect()


def test_per_topic_callbacks_and_a_failing_on_message_behave_as_in_stock_paho(broker: RunningBroker) -> None:
    """The client skips paho's per-topic matching while no per-topic callback is registered; once one is, its topic's
    messages go to it and the rest to ``on_message``, as paho does. A failing ``on_message`` is logged and the loop
    goes on (``suppress_exceptions``), and raises out of the loop otherwise."""
    cid = "filtered"
    publisher = _publisher(broker, "5")
    receiver, got = _receiver(broker, "5", cid)
    filtered: queue.Queue[str] = queue.Queue()
    matcher, matched = receiver._on_message_filtered, []  # paho's per-topic matcher, watched: is it consulted?
    real_match = matcher.iter_match
    matcher.iter_match = lambda topic: matched.append(topic) or real_match(topic)  # type: ignore[method-assign]
    try:
        publisher.publish(f"t/{cid}/a/1", b"1", qos=1).wait_for_publish(10)
        assert _take(got, 1)[0].topic == f"t/{cid}/a/1"  # no per-topic callback: on_message
        assert matched == []  # ... and the matcher was skipped
        receiver.message_callback_add(f"t/{cid}/a/+", lambda client, userdata, msg: filtered.put(msg.topic))
        for topic in (f"t/{cid}/a/2", f"t/{cid}/b/3"):
            publisher.publish(topic, b"x", qos=1).wait_for_publish(10)
        assert filtered.get(timeout=10) == f"t/{cid}/a/2"
        assert _take(got, 1)[0].topic == f"t/{cid}/b/3" and filtered.empty()
        assert matched == [f"t/{cid}/a/2", f"t/{cid}/b/3"]
        receiver.message_callback_remove(f"t/{cid}/a/+")
        receiver.suppress_exceptions = True
        failed = threading.Event()

        def failing(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            failed.set()
            raise ValueError("a bug")

        receiver.on_message = failing
        publisher.publish(f"t/{cid}/a/4", b"x", qos=1).wait_for_publish(10)
        assert failed.wait(10)
        receiver.on_message = lambda client, userdata, msg: got.put(msg)
        publisher.publish(f"t/{cid}/a/5", b"x", qos=1).wait_for_publish(10)
        assert _take(got, 1)[0].topic == f"t/{cid}/a/5"  # the loop lived on
    finally:
        for c in (receiver, publisher):
            c.loop_stop()
            c.disconnect()
    raising = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2)
    raising.on_message = lambda client, userdata, msg: (_ for _ in ()).throw(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        raising._handle_on_message(mqtt.MQTTMessage(topic=b"t"))


@pytest.mark.parametrize("version", VERSIONS)
def test_ack_many_acknowledges_exactly_what_it_names(broker: RunningBroker, version: str) -> None:
    """Manual acknowledgement, persistent session: 100 messages in, 60 acknowledged in one ``ack_many``, the connection
    dropped without a DISCONNECT; the resumed session gets the other 40 again, and only those."""
    cid = f"acks-{version}"
    receiver, got = _receiver(broker, version, cid, persistent=True, manual=True)
    publisher = _publisher(broker, version)
    try:
        for i in range(100):
            publisher.publish(f"t/{cid}/m", str(i).encode(), qos=1).wait_for_publish(10)
        first = _take(got, 100)
        assert receiver.ack_many([(m.mid, m.qos) for m in first[:60]]) == mqtt.MQTT_ERR_SUCCESS
        fence = threading.Event()  # the broker handles a connection's packets in order: after this SUBACK, the PUBACKs
        receiver.on_subscribe = lambda *a: fence.set()
        receiver.subscribe(f"t/{cid}/fence", qos=1)
        assert fence.wait(10)
        receiver.loop_stop()
        sock = receiver.socket()
        assert sock is not None
        sock.close()  # a crash: no DISCONNECT, the session stays
        again, got_again = _receiver(broker, version, cid, persistent=True, manual=True)
        try:
            redelivered = _take(got_again, 40)
            assert sorted(int(m.payload) for m in redelivered) == list(range(60, 100))
            again.ack_many([(m.mid, m.qos) for m in redelivered])
            assert got_again.empty()
        finally:
            again.loop_stop()
            again.disconnect()
    finally:
        publisher.loop_stop()
        publisher.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_what_it_publishes_arrives_and_is_acknowledged_once(broker: RunningBroker, version: str) -> None:
    """Publishing from its own callbacks (queued without waking the loop, written in one go after the reads) and from
    other threads at once (woken as paho does), QoS 0, 1 and 2: a stock paho subscriber gets every message, and each
    QoS 1 and 2 message is acknowledged to the publisher once, as a success."""
    cid = f"pub-{version}"
    settings = BrokerSettings(host=broker.host, port=broker.port, mqtt_version=version)  # type: ignore[arg-type]
    stock, sink = _stock_sink(broker, version, f"t/{cid}/out/#", 2)  # a stock paho client: subscribes, and triggers the callback replies
    ours = transport.client(settings, cid)
    acked: list[tuple[int, bool]] = []
    all_acked = threading.Event()

    def on_publish(c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
        acked.append((mid, reason.is_failure))
        if len(acked) >= 600:
            all_acked.set()

    ours.on_publish = on_publish
    ours.on_message = lambda c, u, m: c.publish(f"t/{cid}/out/reply", m.payload, qos=m.qos)  # an inline answer
    _connect_subscribed(ours, settings, f"t/{cid}/in", 2)
    try:
        expected: list[bytes] = []
        infos = []
        for i in range(600):
            body = f"{i}".encode()
            if i % 2:
                infos.append(ours.publish(f"t/{cid}/out/direct", b"d" + body, qos=i % 3))  # from this thread
                expected.append(b"d" + body)
            else:
                stock.publish(f"t/{cid}/in", b"r" + body, qos=i % 3)  # answered from our loop's thread
                expected.append(b"r" + body)
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
        got = sorted(bytes(m.payload) for m in _take(sink, len(expected)))
        assert got == sorted(expected)
        assert all_acked.wait(10), f"{len(acked)} of 600 reported published"  # QoS 0 once written, 1 and 2 once acknowledged
        assert len(acked) == 600 and len({mid for mid, _ in acked}) == 600
        assert not any(failed for _, failed in acked)
        assert sink.empty()
    finally:
        for c in (ours, stock):
            c.loop_stop()
            c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_threads_sending_beside_the_loop_lose_nothing_and_keep_their_order(broker: RunningBroker, version: str) -> None:
    """A QoS 1 or 2 PUBLISH from another thread is sent by that thread when nothing is queued and the loop is not
    writing (``_send_now``); what the socket does not take is queued for the loop. Messages of up to 4 MiB one at a
    time, then four threads at once (up to 150 KB) while the loop answers a stock client's messages from its own
    thread, through a socket that takes about 32 KiB at a time: every message arrives whole, once, and each thread's
    in the order it sent them."""
    cid = f"threads-{version}"
    settings = BrokerSettings(host=broker.host, port=broker.port, mqtt_version=version)  # type: ignore[arg-type]
    stock, sink = _stock_sink(broker, version, f"t/{cid}/out/#", 2)
    ours = transport.client(settings, cid)
    opened = ours.on_socket_open

    def small_send_buffer(client: Any, userdata: Any, sock: Any) -> None:  # partial sends from 32 KiB on
        if opened is not None:
            opened(client, userdata, sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)

    ours.on_socket_open = small_send_buffer
    ours.on_message = lambda c, u, m: c.publish(f"t/{cid}/out/loop", m.payload, qos=1)
    _connect_subscribed(ours, settings, f"t/{cid}/in", 1)
    sizes = [10, 200, 5_000, 70_000, 150_000]  # (paho copies what is left of a packet at each partial send: no MiBs here)
    per_thread = 100

    def send(thread: int) -> None:
        for i in range(per_thread):
            head = f"{thread}:{i}:".encode()
            qos = 1 + i % 2  # each QoS on its own topic: a broker orders messages within one QoS, not across them
            ours.publish(f"t/{cid}/out/{thread}/{qos}", head + os.urandom(8) * (sizes[(i * 7 + thread) % len(sizes)] // 8), qos=qos)

    try:
        # one at a time from another thread, each sent by that thread (nothing queued): most more than the socket
        # takes at once, so the rest goes to the loop
        for i, size in enumerate([100, 64 << 10, 1 << 20, 4 << 20, 3 << 20, 10]):
            body = f"alone:{i}:".encode() + os.urandom(size)
            threading.Thread(target=ours.publish, args=(f"t/{cid}/out/alone", body, 1)).start()
            assert bytes(_take(sink, 1)[0].payload) == body
        threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for i in range(200):
            stock.publish(f"t/{cid}/in", f"loop:{i}:".encode(), qos=1)
        for t in threads:
            t.join(60)
        got = _take(sink, 4 * per_thread + 200, timeout=60)
        order: dict[str, list[int]] = {}
        for m in got:
            name, index, _ = bytes(m.payload).split(b":", 2)
            order.setdefault(m.topic, []).append(int(index))
            if name != b"loop":
                expected = sizes[(int(index) * 7 + int(name)) % len(sizes)] // 8 * 8 + len(name) + len(index) + 2
                assert len(m.payload) == expected, (m.topic, int(index), len(m.payload))
        for t in range(4):  # whole, once, in order
            assert order[f"t/{cid}/out/{t}/1"] == list(range(0, per_thread, 2))
            assert order[f"t/{cid}/out/{t}/2"] == list(range(1, per_thread, 2))
        assert sorted(order[f"t/{cid}/out/loop"]) == list(range(200))
        assert sink.empty()
    finally:
        for c in (ours, stock):
            c.loop_stop()
            c.disconnect()


class _OneShortSend:
    """The client's socket, whose first large send takes only part of the packet after another thread has queued a
    packet of its own (the moment a worker's direct send can meet another thread's): everything else as the socket."""

    def __init__(self, sock: socket.socket, meanwhile: Any, takes: int = 30_000) -> None:
        self._sock, self._meanwhile, self.done, self.takes = sock, meanwhile, False, takes

    def send(self, data: Any) -> int:
        return self.sendmsg([data])

    def sendmsg(self, buffers: Any) -> int:  # a large PUBLISH from a thread goes out as header + payload (``_send_publish``)
        data = b"".join(buffers)
        if len(data) > 100_000 and not self.done:
            self.done = True
            other = threading.Thread(target=self._meanwhile)
            other.start()
            other.join(10)
            return self._sock.send(data[: self.takes])
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("takes", [5, 30_000])
def test_the_rest_of_a_short_direct_send_goes_before_what_was_queued_meanwhile(broker: RunningBroker, version: str, takes: int) -> None:
    """A red-team read found it: the rest of a PUBLISH whose first bytes a thread sent went to the back of the queue,
    behind a packet another thread queued meanwhile, whose bytes then landed inside the first message's. The socket
    takes 5 bytes (the send cut inside the PUBLISH's header, sent beside its payload) or 30,000 (inside the payload)."""
    cid = f"short-{version}-{takes}"
    settings = BrokerSettings(host=broker.host, port=broker.port, mqtt_version=version)  # type: ignore[arg-type]
    stock, sink = _stock_sink(broker, version, f"t/{cid}/#", 1)
    ours = transport.client(settings, cid)
    connected, dropped = threading.Event(), threading.Event()
    ours.on_connect = lambda *a: connected.set()
    ours.on_disconnect = lambda *a: dropped.set()  # a corrupted stream: the broker closes it, paho sends the first again
    transport.connect(ours, settings)
    ours.loop_start()
    try:
        assert connected.wait(10)
        # QoS 0 (a QoS 1 or 2 publish waits for paho's message lock, which the sender holds; an acknowledgement or a
        # ping the loop queues does not either)
        short = _OneShortSend(ours._sock, lambda: ours.publish(f"t/{cid}/second", b"second", qos=0), takes)
        ours._sock = short
        big = os.urandom(200_000)
        first = ours.publish(f"t/{cid}/first", big, qos=1)
        first.wait_for_publish(10)
        assert short.done and first.is_published()
        got = [(m.topic, bytes(m.payload)) for m in _take(sink, 2)]
        assert sorted(got) == [(f"t/{cid}/first", big), (f"t/{cid}/second", b"second")]
        assert not dropped.is_set() and ours.is_connected()
    finally:
        for c in (ours, stock):
            c.loop_stop()
            c.disconnect()


def _outcome(client: mqtt.Client, header: int, packet: bytes) -> tuple[Any, ...]:
    """What a client makes of one PUBLISH packet from the broker: the message its callback got, or the error."""
    got: list[mqtt.MQTTMessage] = []
    client.on_message = lambda c, u, m: got.append(m)
    client._in_packet = {"command": header, "packet": packet}  # what paho's reader hands the handler
    try:
        rc = client._handle_publish()
    except Exception as exc:
        return ("error", type(exc).__name__)
    if not got:
        return ("nothing", int(rc))
    m = got[0]
    props = m.properties.json() if m.properties is not None else None
    return ("message", int(rc), m._topic, bytes(m.payload), m.qos, m.retain, m.dup, m.mid, props)


@pytest.mark.parametrize("version", VERSIONS)
@given(header=st.sampled_from([0x30, 0x31, 0x32, 0x33, 0x34, 0x36, 0x38, 0x3B]), packet=st.binary(max_size=48))
@settings(max_examples=400, deadline=None)
def test_any_publish_packet_is_taken_as_stock_paho_takes_it(version: str, header: int, packet: bytes) -> None:
    """Differential: truncated, lying and hostile PUBLISH packets (every QoS, the invalid 3 too, dup and retain flags)
    give the fast path the same message, or the same refusal, as stock paho."""
    protocol = protocol_of(version)
    ours = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    stock = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    viewing = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    viewing.payload_views = True
    assert _outcome(ours, header, packet) == _outcome(stock, header, packet) == _outcome(viewing, header, packet)


@pytest.mark.parametrize("version", VERSIONS)
@given(
    header=st.sampled_from([0x30, 0x31, 0x32, 0x3B, 0x34, 0x36]), topic=st.binary(min_size=1, max_size=20), payload=st.binary(max_size=64)
)
@settings(max_examples=200, deadline=None)
def test_well_formed_publishes_are_taken_as_stock_paho_takes_them(version: str, header: int, topic: bytes, payload: bytes) -> None:
    """The same with well-formed packets (any topic bytes, invalid UTF-8 too; QoS 0 to 2, and 3, which paho refuses),
    so the fast path itself is what is compared."""
    v5 = version == "5"
    packet = len(topic).to_bytes(2, "big") + topic + (b"\x01\x02" if header & 0x06 else b"") + (b"\x00" if v5 else b"") + payload
    protocol = protocol_of(version)
    ours = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    stock = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    viewing = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    viewing.payload_views = True
    assert _outcome(ours, header, packet) == _outcome(stock, header, packet) == _outcome(viewing, header, packet)


@pytest.mark.parametrize("version", VERSIONS)
def test_payload_views_kept_past_their_callback_stay_what_was_sent(broker: RunningBroker, version: str) -> None:
    """``payload_views``: each payload is a view into the packet it came in, never into a buffer a later packet is
    read into. Views kept while 40 more messages arrive (small ones several to a read, large ones over several reads,
    at every QoS) each still read as what was published."""
    settings = BrokerSettings(host=broker.host, port=broker.port, mqtt_version=version)  # type: ignore[arg-type]
    ours = transport.client(settings, f"views-{version}")
    ours.payload_views = True
    kept: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    ours.on_message = lambda c, u, m: kept.put(m)
    _connect_subscribed(ours, settings, f"t/views-{version}/#", qos=2)
    publisher = _publisher(broker, version)
    try:
        sent = [os.urandom([10, 3000, 70_000, 300_000][i % 4]) for i in range(40)]
        for i, payload in enumerate(sent):
            publisher.publish(f"t/views-{version}/{i}", payload, qos=i % 3)
        got = _take(kept, len(sent))
        assert all(isinstance(m.payload, memoryview) and m.payload.readonly for m in got if m.qos < 2)  # QoS 2: paho's, bytes
        assert sorted((m.topic, bytes(m.payload)) for m in got) == sorted((f"t/views-{version}/{i}", p) for i, p in enumerate(sent))
    finally:
        for c in (ours, publisher):
            c.loop_stop()
            c.disconnect()


class _Capture:
    """A socket that takes every byte written to it: what a client sends, as bytes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def send(self, data: Any) -> int:
        self.data += data
        return len(data)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("version", VERSIONS)
@given(
    topic=st.binary(min_size=1, max_size=300),
    length=st.sampled_from([0, 1, 100, 127, 128, 16_383, 16_384, 65_536, 262_144, 2_097_151, 2_097_152]) | st.integers(0, 300_000),
    qos=st.sampled_from([1, 2]),
    retain=st.booleans(),
    dup=st.booleans(),
    mid=st.integers(1, 65535),
    expiry=st.none() | st.integers(0, 2**32 - 1),
)
@settings(max_examples=200, deadline=None)
def test_a_gathered_publish_header_is_the_one_paho_writes(
    version: str, topic: bytes, length: int, qos: int, retain: bool, dup: bool, mid: int, expiry: int | None
) -> None:
    """``_send_publish`` sends a large PUBLISH from a thread as its header beside the payload: header and payload are
    byte for byte what stock paho writes (remaining lengths of one to four bytes, MQTT 5 properties or none)."""
    protocol = protocol_of(version)
    properties = _props(MessageExpiryInterval=expiry) if expiry is not None and version == "5" else None
    payload = os.urandom(length)
    header = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)._publish_header(
        mid, topic, length, qos, retain, dup, properties
    )
    stock = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    stock._sock = capture = _Capture()  # type: ignore[assignment]
    stock._send_publish(mid, topic, payload, qos, retain, dup, None, properties)
    assert bytes(capture.data) == bytes(header) + payload


def test_the_queued_rest_of_a_gathered_send_never_shares_a_bytearray_with_the_caller() -> None:
    """What a partial ``sendmsg`` leaves is queued for the loop after ``publish`` returned: a ``bytearray`` payload's
    rest is a copy (the caller may change or resize its buffer then, as stock paho, which copies at once, allows); a
    ``bytes`` payload's a view (it cannot change); a header cut short is joined with the payload."""
    from agent.mqtt import _unsent

    header = b"HEAD"
    for sent in (0, 4, 7):
        payload = bytearray(b"payload-bytes")
        expected = (header + payload)[sent:]
        rest = _unsent((header, payload), sent)
        payload[:] = b"X" * len(payload)  # the caller reuses its buffer
        payload.extend(b"+")  # and resizes it (a BufferError while a view of it is exported)
        assert bytes(rest) == expected
    frozen = b"payload-bytes"
    rest = _unsent((header, frozen), 6)
    assert isinstance(rest, memoryview) and rest.obj is frozen and bytes(rest) == frozen[2:]
    assert _unsent((header, frozen), 2) == b"AD" + frozen
