"""The artifact download's pipeline: the adaptive request window, the writer thread that checks and writes chunks
while replies keep arriving, and the repository server's file checks it no longer redoes per chunk."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.chunks import ChunkManifest, ReceivedChunk
from agent.mqtt import make_client
from agent.settings import BrokerSettings
from agent.update.fetch import AdaptiveWindow, MqttFetcher, download
from agent.update.verify import UpdateRejected, VerifiedUpdate
from agent.wire import RepoRequest
from fleet.dev.broker import RunningBroker
from fleet.transport.repo_server import RepositoryServer

CHUNK = 4096


class Clock:
    """Time the test decides: each reply of a round arrives ``per_reply(window)`` seconds after the last."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rounds(window: AdaptiveWindow, clock: Clock, seconds_per_reply: dict[int, float], replies: int) -> list[int]:
    """Feed ``replies`` replies, each taking the time its window size is given; the window size after each."""
    sizes = []
    for _ in range(replies):
        clock.now += seconds_per_reply[window.size]
        window.arrived(CHUNK)
        sizes.append(window.size)
    return sizes


def test_the_window_doubles_while_that_pays_and_never_passes_its_cap() -> None:
    clock = Clock()
    window = AdaptiveWindow(2, 16, clock)
    faster = {2: 1.0, 4: 0.5, 8: 0.25, 16: 0.125}  # each doubling twice as fast: it always pays
    sizes = rounds(window, clock, faster, 200)
    assert sizes[0] == 2 and max(sizes) == 16 == window.size == sizes[-1]
    assert sorted(set(sizes)) == [2, 4, 8, 16]  # grew one doubling at a time


def test_the_window_goes_back_to_the_best_size_when_doubling_does_not_pay() -> None:
    clock = Clock()
    window = AdaptiveWindow(4, 64, clock)
    flat_after_8 = {4: 1.0, 8: 0.5, 16: 0.49, 32: 0.1}  # 16 is not 10% faster than 8: settle at 8 (32 never tried)
    sizes = rounds(window, clock, flat_after_8, 300)
    assert window.size == 8 and sizes[-100:] == [8] * 100 and 32 not in sizes


def test_a_fixed_window_stays_fixed() -> None:
    clock = Clock()
    window = AdaptiveWindow(8, 8, clock)
    assert set(rounds(window, clock, {8: 0.1}, 50)) == {8}
    assert AdaptiveWindow(8, 2, clock).size == 8  # a cap below the start: the start, fixed


@pytest.fixture
def artifact(tmp_path: Path) -> tuple[Path, bytes, VerifiedUpdate]:
    """A 40-chunk artifact in a repository ROOT, and the update that names it with its signed chunk list."""
    data = os.urandom(40 * CHUNK + 123)
    root = tmp_path / "root"
    (root / "image" / "targets").mkdir(parents=True)
    (root / "image" / "targets" / "a.tar").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    update = VerifiedUpdate("a.tar", "a", "1", "onnx-fp32", 1, len(data), sha, "repo://image/targets/a.tar", ChunkManifest.of(data, CHUNK))
    return root, data, update


def durable_prefix_checker(dest: Path, data: bytes, seen: list[int]) -> Callable[[int], None]:
    """A ``progress`` that checks, when told an offset, that the file already holds exactly those verified bytes
    (it runs on the writer thread: a failed assert there is raised by ``download``)."""

    def progress(offset: int) -> None:
        with open(dest, "rb") as f:
            assert f.read(offset) == data[:offset]
        assert not seen or offset > seen[-1]
        seen.append(offset)

    return progress


@pytest.fixture
def fetcher(mqtt_broker: RunningBroker, artifact: tuple[Path, bytes, VerifiedUpdate]) -> Iterator[MqttFetcher]:
    with RepositoryServer(artifact[0], mqtt_broker.host, mqtt_broker.port, client_id="pipeline-repo"):
        client = make_client(BrokerSettings(host=mqtt_broker.host, port=mqtt_broker.port), "pipeline-dev-fetch")  # as round.py
        f = MqttFetcher(
            mqtt_broker.host, mqtt_broker.port, "pipeline-dev", "repo://", CHUNK, window=2, window_max=8, timeout=5, client=client
        )
        try:
            yield f
        finally:
            f.close()


def test_download_through_the_writer_thread_reports_only_bytes_on_disk(
    fetcher: MqttFetcher, artifact: tuple[Path, bytes, VerifiedUpdate], tmp_path: Path
) -> None:
    _, data, update = artifact
    dest, seen = tmp_path / "a.part", list[int]()
    download(update, fetcher, dest, 0, durable_prefix_checker(dest, data, seen), sync_bytes=3 * CHUNK)
    assert dest.read_bytes() == data
    assert seen[-1] == len(data) and all(o % (3 * CHUNK) == 0 for o in seen[:-1]) and len(seen) == 14
    assert 2 <= fetcher.last_window <= 8


def test_a_tampered_chunk_mid_window_is_refused_and_nothing_after_it_is_kept(
    fetcher: MqttFetcher, artifact: tuple[Path, bytes, VerifiedUpdate], tmp_path: Path
) -> None:
    """Chunk 17 is corrupt on the server itself: the writer refuses it while later replies are already queued, the
    file ends at chunk 17 and the offset told never covers it (asked again 3 times, then the update is refused)."""
    root, data, update = artifact
    tampered = bytearray(data)
    tampered[17 * CHUNK + 5] ^= 0x01
    (root / "image" / "targets" / "a.tar").write_bytes(tampered)
    dest, seen = tmp_path / "a.part", list[int]()
    with pytest.raises(UpdateRejected, match="offset 69632 failed its signed sha256"):
        download(update, fetcher, dest, 0, durable_prefix_checker(dest, data, seen), sync_bytes=2 * CHUNK)
    assert dest.read_bytes() == data[: 17 * CHUNK]
    assert max(seen) == 17 * CHUNK


def test_each_reply_is_hashed_on_arrival_from_its_own_bytes(fetcher: MqttFetcher, artifact: tuple[Path, bytes, VerifiedUpdate]) -> None:
    """The fetcher yields every chunk with the sha256 it computed from the bytes it yields (``ReceivedChunk``): the
    digest the writer then trusts is the chunk's, and matches the signed list."""
    _, data, update = artifact
    got = list(fetcher.read_range(update.url, 0, len(data)))
    assert all(isinstance(c, ReceivedChunk) for c in got) and len(got) == len(update.chunks.sha256)
    assert all(isinstance(c.data, memoryview) and c.data.readonly for c in got)  # no one can write through what was hashed
    assert [c.sha256 for c in got] == [hashlib.sha256(c.data).hexdigest() for c in got] == list(update.chunks.sha256)
    assert b"".join(c.data for c in got) == data


def test_a_received_chunk_is_checked_by_its_length_and_digest() -> None:
    manifest = ChunkManifest.of(b"a" * CHUNK + b"b" * 10, CHUNK)
    assert manifest.check(0, ReceivedChunk(b"a" * CHUNK)) and manifest.check(1, ReceivedChunk(b"b" * 10))
    assert not manifest.check(0, ReceivedChunk(b"c" * CHUNK))  # other bytes hash to another digest
    assert not manifest.check(1, ReceivedChunk(b"b" * 11))  # nor does a chunk of the wrong length pass
    with pytest.raises(TypeError):
        ReceivedChunk(b"c" * CHUNK, manifest.sha256[0])  # type: ignore[call-arg]  # a digest is never handed in


@pytest.mark.parametrize("tampered_at", [None, 17 * CHUNK + 5])
def test_replies_that_split_chunks_are_put_together_and_hashed_by_the_writer(
    mqtt_broker: RunningBroker, artifact: tuple[Path, bytes, VerifiedUpdate], tmp_path: Path, tampered_at: int | None
) -> None:
    """Replies smaller than a chunk and not dividing it (a broker's packet limit does that): no reply's digest is a
    chunk's, so the chunks are assembled and the writer hashes them — the file is whole, and a tampered byte is still
    refused at its chunk."""
    root, data, update = artifact
    if tampered_at is not None:
        tampered = bytearray(data)
        tampered[tampered_at] ^= 0x01
        (root / "image" / "targets" / "a.tar").write_bytes(tampered)
    dest = tmp_path / "a.part"
    with RepositoryServer(root, mqtt_broker.host, mqtt_broker.port, client_id="split-repo"):
        f = MqttFetcher(mqtt_broker.host, mqtt_broker.port, "split-dev", "repo://", CHUNK * 2 // 3, window=4, timeout=5)
        try:
            if tampered_at is None:
                download(update, f, dest, 0, lambda offset: None)
                assert dest.read_bytes() == data
            else:
                with pytest.raises(UpdateRejected, match=f"offset {17 * CHUNK} failed its signed sha256"):
                    download(update, f, dest, 0, lambda offset: None)
                assert dest.read_bytes() == data[: 17 * CHUNK]
        finally:
            f.close()


def test_resume_from_a_saved_offset_rewrites_nothing_before_it(
    fetcher: MqttFetcher, artifact: tuple[Path, bytes, VerifiedUpdate], tmp_path: Path
) -> None:
    _, data, update = artifact
    dest, seen = tmp_path / "a.part", list[int]()
    dest.write_bytes(data[: 10 * CHUNK] + b"unverified tail written after the last fsync")
    download(update, fetcher, dest, 10 * CHUNK, durable_prefix_checker(dest, data, seen))
    assert dest.read_bytes() == data and seen == [len(data)]


def test_a_served_file_replaced_by_a_symlink_out_is_checked_again(artifact: tuple[Path, bytes, VerifiedUpdate], tmp_path: Path) -> None:
    """The server remembers which files it checked; a remembered path that now leads elsewhere is not served."""
    root, data, _ = artifact
    server = RepositoryServer(root, "127.0.0.1", 1)  # not started: serve() is the file logic
    path = root / "image" / "targets" / "a.tar"
    assert server.serve(RepoRequest("r", "image/targets/a.tar", CHUNK, CHUNK), "d").data == data[CHUNK : 2 * CHUNK]
    secret = tmp_path / "secret"
    secret.write_bytes(b"private key material")
    path.unlink()
    os.symlink(secret, path)
    assert server.serve(RepoRequest("r", "image/targets/a.tar"), "d").status == 404
    path.unlink()
    path.write_bytes(b"a new file under the old name")  # replaced: another inode, served as it is now
    reply = server.serve(RepoRequest("r", "image/targets/a.tar"), "d")
    assert (reply.status, reply.data, reply.total) == (200, b"a new file under the old name", 29)
    assert server.serve(RepoRequest("r", "image/targets/a.tar", 30), "d").status == 416
