"""Fetching from the repositories: the transports python-tuf reads metadata through, and the artifact download.

``MqttFetcher`` is a python-tuf fetcher that pulls repository files over MQTT, a window of chunks at a time:
``tuf.ngclient.Updater`` asks for URLs; this maps ``base_url + path`` to repository requests (see
``agent.wire.repo``), keeps up to ``window`` chunk requests in flight, yields the bytes in order and turns a
missing file into ``DownloadHTTPError(404)`` as the Updater expects. A lost reply (broker restart) is
re-requested. ``DirectoryFetcher`` serves the same from a local directory.

``download`` fetches a verified update's artifact chunk by chunk, each checked on arrival, resumable after a
crash. The partial file only ever holds chunks whose sha256 matched the signed chunk list, and the offset
reported to ``progress`` (every 4 MiB and at the end) covers only bytes already fsynced — so after ``kill -9``
the download restarts from that offset and nothing unchecked is kept. A chunk that does not match (corrupted,
truncated) is requested again; a transport error (broker restart) raises ``RepositoryUnreachable`` so the
caller retries later from the same offset; a full disk raises ``DiskFull``. Given ``Sources``
(``agent.update.mirrors``), the HTTP mirrors are asked first, one at a time from the last verified chunk, and a
mirror at fault is refused instead — the repository over MQTT finishes what they leave.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import paho.mqtt.client as mqtt
from tuf.api import exceptions as tuf_errors
from tuf.ngclient.fetcher import FetcherInterface

from agent import logs
from agent.errors import EdgefleetError
from agent.mqtt import tcp_nodelay
from agent.update.mirrors import Sources
from agent.update.verify import RepositoryUnreachable, UpdateRejected, VerifiedUpdate
from agent.wire import MAX_CHUNK, RepoReply, RepoRequest, WireError, repo_reply_topic, repo_request_topic

__all__ = ["ChunkSource", "DirectoryFetcher", "DiskFull", "MqttFetcher", "check_disk_space", "download"]

log = logging.getLogger("edgefleet.download")

REPLY_OVERHEAD = 1024  # MQTT fixed header + topic + properties + our JSON reply header, with room to spare


class MqttFetcher(FetcherInterface):
    def __init__(
        self,
        host: str,
        port: int,
        device_id: str,
        base_url: str,
        chunk_size: int = MAX_CHUNK,
        window: int = 4,
        timeout: float = 10.0,
        retries: int = 3,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5,
        client: mqtt.Client | None = None,
    ) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.reply_topic = repo_reply_topic(device_id)
        self.request_topic = repo_request_topic(device_id)
        self.chunk_size = max(1, min(chunk_size, MAX_CHUNK))
        self.window, self.timeout, self.retries = max(1, window), timeout, retries
        self._pending: dict[str, queue.Queue[RepoReply]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        # A client made by agent.mqtt.make_client carries the device's credentials and TLS.
        self._client = client or mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{device_id}-fetch", protocol=protocol)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_socket_open = tcp_nodelay
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        if not self._ready.wait(timeout):
            self.close()
            raise ConnectionError(f"no MQTT connection to {host}:{port}")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        # paho ignores the broker's MaximumPacketSize (an oversized packet loops reconnecting): ask for chunks that fit.
        limit = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        if isinstance(limit, int) and limit > REPLY_OVERHEAD:
            self.chunk_size = min(self.chunk_size, limit - REPLY_OVERHEAD)
        client.subscribe(self.reply_topic, qos=1)
        self._ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            reply = RepoReply.decode(bytes(msg.payload))
        except WireError:
            return  # not ours to answer; the request it belonged to will time out and be retried
        with self._lock:
            waiter = self._pending.get(reply.request_id)
        if waiter is not None:
            try:
                waiter.put_nowait(reply)  # never block paho's network thread: a duplicate (QoS 1 redelivery) is dropped
            except queue.Full:
                pass

    def _send(self, path: str, offset: int) -> tuple[str, queue.Queue[RepoReply]]:
        rid = uuid.uuid4().hex
        waiter: queue.Queue[RepoReply] = queue.Queue(maxsize=1)
        with self._lock:
            self._pending[rid] = waiter
        req = RepoRequest(rid, path, offset, self.chunk_size)
        self._client.publish(self.request_topic, req.encode(), qos=1)
        return rid, waiter

    def _await(self, path: str, offset: int, sent: tuple[str, queue.Queue[RepoReply]]) -> RepoReply:
        rid, waiter = sent
        for attempt in range(self.retries + 1):
            try:
                reply = waiter.get(timeout=self.timeout)
                break
            except queue.Empty:
                with self._lock:
                    self._pending.pop(rid, None)
                if attempt == self.retries:
                    raise tuf_errors.DownloadError(f"no reply for {path} at offset {offset} after {self.retries + 1} tries") from None
                rid, waiter = self._send(path, offset)
        with self._lock:
            self._pending.pop(rid, None)
        if reply.status == 404:
            raise tuf_errors.DownloadHTTPError(f"{path}: not found", 404)
        if reply.status != 200:
            raise tuf_errors.DownloadHTTPError(f"{path}: {reply.error or 'error'}", reply.status)
        if reply.offset != offset:
            raise tuf_errors.DownloadError(f"{path}: reply for offset {reply.offset}, expected {offset}")
        return reply

    def _path(self, url: str) -> str:
        if not url.startswith(self.base_url):
            raise tuf_errors.DownloadHTTPError(f"{url} is outside {self.base_url}", 404)
        return url[len(self.base_url) :]

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self._path(url)
        first = self._await(path, 0, self._send(path, 0))
        return self._stream(path, first, first.total)

    def read_range(self, url: str, offset: int, size: int) -> Iterator[bytes]:
        """Bytes ``offset..size`` of a file whose signed length is ``size``; another size on the server is an error."""
        path = self._path(url)
        first = self._await(path, offset, self._send(path, offset))
        if first.total != size:
            raise tuf_errors.DownloadLengthMismatchError(f"{path}: {first.total} bytes on the server, the signed length is {size}")
        return self._stream(path, first, size)

    def _stream(self, path: str, first: RepoReply, total: int) -> Iterator[bytes]:
        yield first.data
        offset = first.offset + len(first.data)
        inflight: list[tuple[int, tuple[str, queue.Queue[RepoReply]]]] = []
        next_offset = offset
        try:
            while offset < total:
                while len(inflight) < self.window and next_offset < total:
                    inflight.append((next_offset, self._send(path, next_offset)))
                    next_offset += self.chunk_size
                chunk_offset, sent = inflight.pop(0)
                reply = self._await(path, chunk_offset, sent)
                if len(reply.data) != min(self.chunk_size, total - chunk_offset) or reply.total != total:
                    raise tuf_errors.DownloadError(f"{path}: chunk at {chunk_offset} has {len(reply.data)} bytes (file {reply.total})")
                offset = chunk_offset + len(reply.data)
                yield reply.data
        finally:  # an abandoned stream (length cap hit, error) must not leave waiters for late replies
            with self._lock:
                for _, (rid, _waiter) in inflight:
                    self._pending.pop(rid, None)


class DirectoryFetcher(FetcherInterface):
    """Serves a repository from a local directory (a USB stick, a mounted share) with the same 404 semantics."""

    def __init__(self, root: str | Path, base_url: str) -> None:
        self.root = Path(root).resolve()
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"

    def _local(self, url: str) -> Path:
        path = (self.root / url.removeprefix(self.base_url)).resolve()
        if not url.startswith(self.base_url) or not path.is_relative_to(self.root) or not path.is_file():
            raise tuf_errors.DownloadHTTPError(f"not found: {url}", 404)
        return path

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._read(self._local(url), url, 0, None)

    def read_range(self, url: str, offset: int, size: int) -> Iterator[bytes]:
        path = self._local(url)
        if path.stat().st_size != size:
            raise tuf_errors.DownloadLengthMismatchError(f"{url}: {path.stat().st_size} bytes, the signed length is {size}")
        return self._read(path, url, offset, size)

    @staticmethod
    def _read(path: Path, url: str, offset: int, size: int | None) -> Iterator[bytes]:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                while block := f.read(MAX_CHUNK if size is None else min(MAX_CHUNK, size - f.tell())):
                    yield block
        except OSError as exc:  # a pulled USB stick, permissions: a download error like any other
            raise tuf_errors.DownloadError(f"{url}: {exc}") from exc


# -- the artifact download ------------------------------------------------------

Progress = Callable[[int], None]  # told each offset up to which the verified bytes are durable
SYNC_BYTES = 4 * 1024 * 1024  # fsync (and record the offset) this often: per 256 KiB chunk halved the throughput


def _sync(f: BinaryIO, offset: int, synced: int, progress: Callable[[int], None]) -> int:
    """Make the verified bytes durable, then (only then) record how far they go."""
    if offset != synced:
        f.flush()
        os.fsync(f.fileno())
        progress(offset)
    return offset


class DiskFull(EdgefleetError):
    code = "disk_full"


class ChunkSource(Protocol):
    def read_range(self, url: str, offset: int, size: int) -> Iterator[bytes]: ...


def check_disk_space(directory: Path, needed: int, reserve: int) -> None:
    """Refuse to start what cannot finish: ``needed`` bytes plus a reserve the device keeps for itself."""
    free = shutil.disk_usage(directory).free
    if free < needed + reserve:
        raise DiskFull(f"{needed} bytes needed plus a {reserve}-byte reserve, {free} free in {directory}")


def download(
    update: VerifiedUpdate,
    source: ChunkSource,
    dest: Path,
    offset: int,
    progress: Callable[[int], None],
    chunk_retries: int = 3,
    sync_bytes: int = SYNC_BYTES,
) -> None:
    """Continue ``dest`` from ``offset`` (a chunk boundary already verified) to the signed length.

    With ``Sources``, each mirror in turn continues from the last verified chunk (an HTTP Range request) and is
    refused at its first fault; the MQTT repository finishes whatever is left.
    """
    chunks = update.chunks
    if offset % chunks.chunk_size or offset > update.length:
        offset = 0  # not a state we wrote: start over rather than trust it
    try:
        with open(dest, "ab") as f:  # create if missing, never truncate what verified
            pass
        with open(dest, "r+b") as f:
            f.truncate(offset)
            f.seek(offset)
            if isinstance(source, Sources):
                offset = _from_mirrors(update, source, f, offset, progress, sync_bytes)
                source = source.last  # type: ignore[assignment]  # an MqttFetcher or DirectoryFetcher: a ChunkSource
            if offset < update.length:
                _from_last(update, source, f, offset, progress, chunk_retries, sync_bytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            dest.unlink(missing_ok=True)
            raise DiskFull(f"disk full while writing {dest.name}: {exc.strerror}") from exc
        raise


def _from_mirrors(update: VerifiedUpdate, sources: Sources, f: BinaryIO, offset: int, progress: Progress, sync_bytes: int) -> int:
    """Fill ``f`` from each usable mirror in turn; how far the verified bytes go when the mirrors are done."""
    for mirror in sources.usable():
        try:
            bad = _fill(update, mirror, f, offset, progress, sync_bytes)
        except tuf_errors.DownloadError as exc:  # stalled, closed, wrong length, HTTP error
            offset = f.tell()  # every byte written was a verified chunk
            if not (isinstance(exc, tuf_errors.DownloadHTTPError) and exc.status_code == 404):  # not there yet: not a fault
                sources.refuse(mirror, update.url, str(exc))
            continue
        if bad is None:
            return update.length
        offset = bad
        sources.refuse(mirror, update.url, f"bytes at offset {bad} fail the signed chunk list (tampered or truncated)")
    return offset


def _from_last(
    update: VerifiedUpdate, source: ChunkSource, f: BinaryIO, offset: int, progress: Progress, chunk_retries: int, sync_bytes: int
) -> None:
    """Fill ``f`` from the repository itself: a bad chunk is asked for again (``chunk_retries`` times), a transport
    error is ``RepositoryUnreachable`` (retry later from the same offset), a wrong length or a 404 ``UpdateRejected``."""
    failures = 0
    while offset < update.length:
        try:
            bad = _fill(update, source, f, offset, progress, sync_bytes)
        except tuf_errors.DownloadLengthMismatchError as exc:
            raise UpdateRejected(str(exc)) from exc
        except tuf_errors.DownloadHTTPError as exc:
            if exc.status_code == 404:
                raise UpdateRejected(f"{update.target_path}: not on the repository server") from exc
            raise RepositoryUnreachable(f"{update.target_path}: {exc}") from exc
        except tuf_errors.DownloadError as exc:
            raise RepositoryUnreachable(f"{update.target_path} at offset {f.tell()}: {exc}") from exc
        if bad is None:
            return
        offset = bad
        failures += 1
        logs.event(log, "download.bad_chunk", logging.WARNING, target=update.target_path, offset=offset, attempt=failures)
        if failures > chunk_retries:
            raise UpdateRejected(f"{update.target_path}: the chunk at offset {offset} failed its signed sha256 {failures} times")


def _fill(
    update: VerifiedUpdate, source: ChunkSource, f: BinaryIO, offset: int, progress: Callable[[int], None], sync_bytes: int
) -> int | None:
    """Write verified chunks from ``offset``; the offset of a chunk that failed its hash (or where a short stream
    ended), or None when done. Transport errors propagate as python-tuf's ``DownloadError``s."""
    chunks = update.chunks
    index = offset // chunks.chunk_size
    pending = bytearray()
    stream: Iterator[bytes] | None = None
    try:
        stream = source.read_range(update.url, offset, update.length)
        synced = offset
        for data in stream:
            if not pending and index < len(chunks.sha256) and len(data) == chunks.chunk_length(index):
                ready = [data]  # the usual case: one reply is one chunk, no copying
            else:
                pending += data
                ready = []
                while index + len(ready) < len(chunks.sha256) and len(pending) >= chunks.chunk_length(index + len(ready)):
                    n = chunks.chunk_length(index + len(ready))
                    ready.append(bytes(pending[:n]))
                    del pending[:n]
            for chunk in ready:
                if not chunks.check(index, chunk):
                    _sync(f, offset, synced, progress)
                    return offset
                f.write(chunk)
                offset += len(chunk)
                index += 1
                if offset - synced >= sync_bytes:
                    synced = _sync(f, offset, synced, progress)
        _sync(f, offset, synced, progress)
        if offset != update.length or pending:
            return offset  # the stream ended early or ran long: ask again from the last good chunk
        return None
    finally:
        close = getattr(stream, "close", None)  # a generator: stop its in-flight requests
        if close is not None:
            close()
