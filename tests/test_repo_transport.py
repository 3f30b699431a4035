"""TUF metadata and bundles pulled over a real mosquitto: RepositoryServer <-> MqttFetcher <-> ngclient.Updater."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import ModelFiles
from hypothesis import given, settings
from hypothesis import strategies as st
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import Updater

from agent.update.fetch import MqttFetcher
from agent.wire import RepoReply, RepoRequest, WireError, repo_reply_topic, repo_request_topic
from converters.build import build
from fleet.dev.broker import RunningBroker
from fleet.transport.repo_server import RepositoryServer
from fleet.tuf.image_repo import ImageRepository
from fleet.tuf.keys import init_keys

BASE = "mqtt://"  # the server serves ROOT (image/ and director/ inside it); the agent uses "repo://"
IMG = BASE + "image/"


@pytest.fixture(scope="module")
def released(models: ModelFiles, tmp_path_factory: pytest.TempPathFactory) -> ImageRepository:
    root = tmp_path_factory.mktemp("repo")
    keys = init_keys(root / "keys")
    image = ImageRepository.create(root / "image", keys)
    build(models.path("mlp.onnx"), "mlp", "1.0.0", root / "mlp-1.0.0", variants=["onnx-fp32", "openvino-fp32"])
    image.release(root / "mlp-1.0.0", keys)
    return image


def updater(image: ImageRepository, device: Path, fetcher: MqttFetcher) -> Updater:
    (device / "metadata").mkdir(parents=True, exist_ok=True)
    (device / "targets").mkdir(exist_ok=True)
    if not (device / "metadata" / "root.json").exists():
        shutil.copy(image.metadata / "1.root.json", device / "metadata" / "root.json")
    return Updater(str(device / "metadata"), IMG + "metadata/", str(device / "targets"), IMG + "targets/", fetcher=fetcher, bootstrap=None)


def test_update_over_mqtt_in_small_windowed_chunks(released: ImageRepository, mqtt_broker: RunningBroker, tmp_path: Path) -> None:
    with RepositoryServer(released.directory.parent, mqtt_broker.host, mqtt_broker.port, client_id="repo-1") as server:
        fetcher = MqttFetcher(mqtt_broker.host, mqtt_broker.port, "dev-1", BASE, chunk_size=4096, window=3)
        try:
            up = updater(released, tmp_path / "dev", fetcher)
            up.refresh()  # also asks for 2.root.json, which is a 404: the Updater takes that as "no newer root"
            info = up.get_targetinfo("mlp/1.0.0/openvino-fp32.tar")
            assert info is not None and info.length > 3 * 4096  # several windows of chunks
            path = up.download_target(info)
            assert Path(path).stat().st_size == info.length
        finally:
            fetcher.close()
        assert server.counters["status_404"] >= 1 and server.counters["status_200"] > info.length // 4096
        assert server.counters["bad_request"] == 0


def test_missing_and_out_of_range(released: ImageRepository, mqtt_broker: RunningBroker) -> None:
    with RepositoryServer(released.directory.parent, mqtt_broker.host, mqtt_broker.port, client_id="repo-2"):
        fetcher = MqttFetcher(mqtt_broker.host, mqtt_broker.port, "dev-2", BASE, timeout=5)
        try:
            with pytest.raises(tuf_errors.DownloadHTTPError) as info:
                b"".join(fetcher.fetch(IMG + "metadata/99.root.json"))
            assert info.value.status_code == 404
            with pytest.raises(tuf_errors.DownloadHTTPError):
                b"".join(fetcher.fetch("https://elsewhere/metadata/1.root.json"))
            assert b"".join(fetcher.fetch(IMG + "metadata/1.root.json")) == (released.metadata / "1.root.json").read_bytes()
        finally:
            fetcher.close()


def test_paths_outside_the_repository_are_not_served(released: ImageRepository, tmp_path: Path) -> None:
    server = RepositoryServer(released.directory.parent, "127.0.0.1", 1)  # not started: serve() is the file logic
    secret = tmp_path / "secret.txt"
    secret.write_text("private key material")
    link = released.directory / "metadata" / "escape.json"
    os.symlink(secret, link)
    try:
        assert server.serve(RepoRequest("r", "image/metadata/escape.json"), "d").status == 404
    finally:
        link.unlink()
    for hostile in ("../keys/root.pem", "metadata/../../etc/passwd", "/etc/passwd", "metadata//x", "a" * 600):
        with pytest.raises(WireError):
            RepoRequest.decode(json.dumps({"request_id": "r", "path": hostile}).encode())
    assert server.serve(RepoRequest("r", "image/metadata/1.root.json", offset=10**9), "d").status == 416
    assert server.serve(RepoRequest("r", "image/metadata/1.root.json"), "d").status == 200
    # ROOT holds more than the two repositories (here the keys): only image/ and the device's own director/ are served
    assert (released.directory.parent / "keys").is_dir()
    for elsewhere in (
        "keys/" + next(p.name for p in (released.directory.parent / "keys").iterdir()),
        "director/victim/metadata/1.root.json",
    ):
        assert server.serve(RepoRequest("r", elsewhere), "d").status == 404


def test_hostile_requests_are_counted_and_the_server_keeps_serving(released: ImageRepository, mqtt_broker: RunningBroker) -> None:
    with RepositoryServer(released.directory.parent, mqtt_broker.host, mqtt_broker.port, client_id="repo-3") as server:
        attacker = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker")
        attacker.connect(mqtt_broker.host, mqtt_broker.port)
        attacker.loop_start()
        bad = [
            b"",
            b"\xff\xfe",
            b"[]",
            b"{}",
            b"x" * 10_000,
            json.dumps({"request_id": "r", "reply_to": "edgefleet/v1/dev/victim/cmd", "path": "image/metadata/1.root.json"}).encode(),
            json.dumps({"request_id": "r", "path": "image/metadata/1.root.json", "length": 10**9}).encode(),
            json.dumps({"request_id": "r", "path": 5, "offset": "x"}).encode(),
            b"[" * 3000 + b"]" * 3000,
        ]
        for payload in bad:
            attacker.publish(repo_request_topic("attacker"), payload, qos=1).wait_for_publish(5)
        attacker.publish("edgefleet/v1/repo/req/bad id", b"{}", qos=1).wait_for_publish(5)  # no such device topic
        attacker.loop_stop()
        attacker.disconnect()
        fetcher = MqttFetcher(mqtt_broker.host, mqtt_broker.port, "dev-3", BASE, timeout=5)
        try:
            assert b"".join(fetcher.fetch(IMG + "metadata/timestamp.json")) == (released.metadata / "timestamp.json").read_bytes()
        finally:
            fetcher.close()
        assert server.counters["bad_request"] == len(bad) and server.counters["internal_error"] == 0


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=600)
    | st.dictionaries(st.text(max_size=12), st.one_of(st.text(max_size=40), st.integers(), st.none()), max_size=6).map(
        lambda d: json.dumps(d).encode()
    )
)
def test_request_decoder_never_crashes(payload: bytes) -> None:
    try:
        req = RepoRequest.decode(payload)
    except WireError:
        return
    assert ".." not in req.path.split("/") and 0 < req.length <= 256 * 1024 and req.offset >= 0


def test_broker_restart_mid_download_resumes(released: ImageRepository, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from fleet.dev.broker import start_broker

    with start_broker(tmp_path_factory.mktemp("b")) as broker:
        with RepositoryServer(released.directory.parent, broker.host, broker.port, client_id="repo-4"):
            fetcher = MqttFetcher(broker.host, broker.port, "dev-4", BASE, chunk_size=2048, window=2, timeout=2, retries=10)
            try:
                target = next((released.targets_dir / "mlp" / "1.0.0").glob("*.openvino-fp32.tar"))
                url = IMG + "targets/mlp/1.0.0/" + target.name
                stream = fetcher.fetch(url)
                first = next(stream)
                broker.start_again()  # every connection drops; paho reconnects, lost requests are re-sent
                rest = b"".join(stream)
                assert first + rest == target.read_bytes()
            finally:
                fetcher.close()


def test_chunks_fit_the_brokers_maximum_packet_size(released: ImageRepository, tmp_path_factory: pytest.TempPathFactory) -> None:
    """paho would loop reconnecting on an oversized packet: the fetcher asks for chunks the broker can carry."""
    from fleet.dev.broker import start_broker

    with start_broker(tmp_path_factory.mktemp("small-packets"), extra_config=["max_packet_size 16384"]) as broker:
        with RepositoryServer(released.directory.parent, broker.host, broker.port, client_id="repo-5"):
            fetcher = MqttFetcher(broker.host, broker.port, "dev-5", BASE, timeout=5)
            try:
                assert fetcher.chunk_size <= 16384 - 1024
                target = next((released.targets_dir / "mlp" / "1.0.0").glob("*.openvino-fp32.tar"))
                data = b"".join(c.data for c in fetcher.read_range(IMG + "targets/mlp/1.0.0/" + target.name, 0, target.stat().st_size))
                assert data == target.read_bytes() and len(data) > 16384
            finally:
                fetcher.close()


def test_replies_go_to_the_asking_devices_own_topic_whatever_the_payload_says(
    released: ImageRepository, mqtt_broker: RunningBroker
) -> None:
    """Requests naming a victim's reply topic put nothing on it: the reply topic comes from the request topic."""
    from update_rig import Subscriber, wait_for

    with RepositoryServer(released.directory.parent, mqtt_broker.host, mqtt_broker.port, client_id="repo-6") as server:
        victim = Subscriber(mqtt_broker, [repo_reply_topic("victim")], "victim-watch")
        mallory = Subscriber(mqtt_broker, [repo_reply_topic("mallory")], "mallory")
        try:
            hostile = json.dumps({"request_id": "x", "reply_to": repo_reply_topic("victim"), "path": "image/metadata/1.root.json"})
            asked = json.dumps({"request_id": "y", "path": "director/victim/metadata/1.root.json"})  # another device's assignment
            for _ in range(30):  # 60: within one device's line (64)
                mallory.client.publish(repo_request_topic("mallory"), hostile.encode(), qos=1)
                mallory.client.publish(repo_request_topic("mallory"), asked.encode(), qos=1)
            wait_for(lambda: len(mallory.payloads()) == 60, 30, "mallory's own 60 answers")
            codes = sorted({json.loads(p.split(b"\n", 1)[0])["status"] for p in mallory.payloads()})
            assert codes == [400, 404]
            fetcher = MqttFetcher(mqtt_broker.host, mqtt_broker.port, "victim", BASE, timeout=5)
            try:  # the victim's own request, after all of mallory's: its answer is the first thing on its topic
                assert b"".join(fetcher.fetch(IMG + "metadata/1.root.json")) == (released.metadata / "1.root.json").read_bytes()
            finally:
                fetcher.close()
            wait_for(lambda: len(victim.payloads()) >= 1, 10, "the victim's own answer")
            assert all(json.loads(p.split(b"\n", 1)[0])["request_id"] not in ("x", "y") for p in victim.payloads())
            assert server.counters["bad_request"] == 30 and server.counters["status_404"] == 30
        finally:
            victim.close()
            mallory.close()


def test_duplicate_stray_and_garbage_replies_change_nothing_a_download_gets(mqtt_broker: RunningBroker) -> None:
    """A peer on the device's reply topic (here an unmodified paho client standing in for the server) answers every
    request twice, adds a reply to a request id nobody sent and a payload that is no reply: the fetcher takes each
    chunk once, in order, drops the rest, and awaits nothing afterwards."""
    content = os.urandom(40 * 1024 + 123)
    answered = threading.Event()

    def serve(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        req = RepoRequest.decode(msg.payload)
        data = content[req.offset : req.offset + req.length]
        reply = RepoReply(req.request_id, 200, len(content), req.offset, data).encode()
        topic = repo_reply_topic("dup")
        for payload in (reply, RepoReply("nobody-asked", 200, len(content), req.offset, b"x" * len(data)).encode(), b"\x00garbage", reply):
            client.publish(topic, payload, qos=1)
        answered.set()

    peer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dup-peer")
    subscribed = threading.Event()
    peer.on_message = serve
    peer.on_subscribe = lambda *a: subscribed.set()
    peer.connect(mqtt_broker.host, mqtt_broker.port)
    peer.loop_start()
    peer.subscribe(repo_request_topic("dup"), qos=1)
    assert subscribed.wait(10)
    fetcher = MqttFetcher(mqtt_broker.host, mqtt_broker.port, "dup", BASE, chunk_size=4096, window=3, timeout=5)
    try:
        got = b"".join(c.data for c in fetcher.read_range(IMG + "targets/x.bin", 0, len(content)))
        assert got == content and answered.is_set()
        assert fetcher._replies == {}  # nothing left awaited: late duplicates have nowhere to go
    finally:
        fetcher.close()
        peer.loop_stop()
        peer.disconnect()


def test_a_file_cut_short_while_read_gives_a_short_chunk(tmp_path: Path) -> None:
    """The server reads a chunk straight into its reply (``RepoReply.with_room``); a file shorter than its size said
    (cut while being served) gives the bytes that are there, which the device refuses by length and asks again."""
    from fleet.transport.repo_server import _read_reply

    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        whole = _read_reply(fd, RepoRequest("r", "image/f.bin", 10, 50), 100)
        assert (whole.status, bytes(whole.data), whole.encode()) == (200, b"a" * 50, RepoReply("r", 200, 100, 10, b"a" * 50).encode())
        short = _read_reply(fd, RepoRequest("r", "image/f.bin", 60, 256), 300)  # fstat said 300 bytes; 100 are there
        assert (short.status, bytes(short.data), short.total) == (200, b"a" * 40, 300)
    finally:
        os.close(fd)


def test_a_flooding_device_gets_its_share_and_others_are_served(released: ImageRepository, mqtt_broker: RunningBroker) -> None:
    """A device asking for 1,000 chunks of 256 KiB at once: at most ``max_pending`` of its requests wait (the rest are
    dropped before they cost a read), at most 8 of its replies are on their way to the broker at a time, and it takes
    turns with everyone. Another device's request waited 0.6-1.9 s behind such a flood on this machine while replies
    could queue without bound on the server's one connection; now 0.02-0.17 s."""
    import time

    from update_rig import Subscriber, wait_for

    target = next((released.targets_dir / "mlp" / "1.0.0").glob("*.openvino-fp32.tar"))
    big = f"image/targets/mlp/1.0.0/{target.name}"
    with RepositoryServer(released.directory.parent, mqtt_broker.host, mqtt_broker.port, client_id="repo-7") as server:
        flood = Subscriber(mqtt_broker, [repo_reply_topic("flood")], "flooder")
        good = MqttFetcher(mqtt_broker.host, mqtt_broker.port, "good", BASE, timeout=10)
        expected = (released.metadata / "1.root.json").read_bytes()
        try:
            latencies = []
            for burst in range(3):
                for i in range(1000):  # 250 MB of reads asked for at once
                    request = {"request_id": f"f{burst}-{i}", "path": big, "offset": 0, "length": 256 * 1024}
                    flood.client.publish(repo_request_topic("flood"), json.dumps(request).encode(), qos=0)
                t0 = time.perf_counter()
                assert b"".join(good.fetch(IMG + "metadata/1.root.json")) == expected
                latencies.append(time.perf_counter() - t0)
            assert max(latencies) < 1.0, latencies
            wait_for(lambda: server.counters["dropped"] > 0, 20, "the flood past its limit dropped")
            assert server.alive()
        finally:
            good.close()
            flood.close()
