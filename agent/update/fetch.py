"""Fetching from the repositories: the transports python-tuf reads metadata through, and the artifact download.

``MqttFetcher`` is a python-tuf fetcher that pulls repository files over MQTT, a window of chunks at a time:
``tuf.ngclient.Updater`` asks for URLs; this maps ``base_url + path`` to repository requests (see
``agent.wire.repo``), keeps a window of chunk requests in flight (``AdaptiveWindow``: it grows while that pays),
yields the bytes in order (memoryviews into the replies, never copied, each hashed as it arrived) and turns a
missing file into ``DownloadHTTPError(404)`` as the Updater expects. A lost reply (broker restart) is
re-requested. ``DirectoryFetcher`` serves the same from a local directory.

``download`` fetches a verified update's artifact chunk by chunk, each checked on arrival, resumable after a
crash. A writer thread checks and writes the chunks while the replies keep arriving. The partial file only ever
holds chunks whose sha256 matched the signed chunk list, and the offset
reported to ``progress`` (every 4 MiB and at the end) covers only bytes already fsynced — so after ``kill -9``
the download restarts from that offset and nothing unchecked is kept. A chunk that does not match (corrupted,
truncated) is requested again; a transport error (broker restart) raises ``RepositoryUnreachable`` so the
caller retries later from the same offset; a full disk raises ``DiskFull``. Given ``Sources``
(``agent.update.mirrors``), the HTTP mirrors are asked first, one at a time from the last verified chunk, and a
mirror at fault is refused instead — the repository over MQTT finishes what they leave.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import paho.mqtt.client as mqtt
from tuf.api import exceptions as tuf_errors
from tuf.ngclient.fetcher import FetcherInterface

from agent import logs
from agent.chunks import Chunk, ChunkManifest, ReceivedChunk
from agent.errors import EdgefleetError
from agent.mqtt import ReadAheadClient, tcp_nodelay
from agent.update.mirrors import Sources
from agent.update.verify import RepositoryUnreachable, UpdateRejected, VerifiedUpdate
from agent.wire import MAX_CHUNK, RepoReply, RepoRequest, WireError, repo_reply_topic, repo_request_topic

__all__ = ["AdaptiveWindow", "Chunk", "ChunkSource", "DirectoryFetcher", "DiskFull", "MqttFetcher", "check_disk_space", "download"]

log = logging.getLogger("edgefleet.download")

_ANSWERED = object()  # what ``_replies`` gives for a request id no longer awaited
REPLY_OVERHEAD = 1024  # MQTT fixed header + topic + properties + our JSON reply header, with room to spare


@dataclass(frozen=True, slots=True)
class _Arrival:
    reply: RepoReply
    chunk: ReceivedChunk | None  # the reply's data (a view into the packet read) with its sha256, hashed on arrival


class MqttFetcher(FetcherInterface):
    def __init__(
        self,
        host: str,
        port: int,
        device_id: str,
        base_url: str,
        chunk_size: int = MAX_CHUNK,
        window: int = 8,
        timeout: float = 10.0,
        retries: int = 3,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5,
        client: mqtt.Client | None = None,
        window_max: int | None = None,
    ) -> None:
        """``window``: chunk requests kept in flight at first; ``window_max`` above it lets the window grow while that
        pays (``AdaptiveWindow``), None keeps it fixed."""
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.reply_topic = repo_reply_topic(device_id)
        self.request_topic = repo_request_topic(device_id)
        self.chunk_size = max(1, min(chunk_size, MAX_CHUNK))
        self.window, self.timeout, self.retries = max(1, window), timeout, retries
        self.window_max = max(self.window, window_max or self.window)
        self.last_window = self.window  # where the latest stream's window settled (benchmarks, logs)
        # Request id -> its reply once arrived (None until then), for the requests still awaited; one condition for all:
        # a queue per request cost more than the rest of sending it (benchmarks/transfer.py).
        self._replies: dict[str, _Arrival | None] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:16]  # this fetcher's: a late reply to another fetcher's request never matches
        self._ready = threading.Event()
        # A client made by agent.mqtt.make_client carries the device's credentials and TLS.
        self._client = client or mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{device_id}-fetch", protocol=protocol)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_socket_open = tcp_nodelay
        if isinstance(self._client, ReadAheadClient):
            self._client.payload_views = True  # a reply's chunk is a view into the packet paho read: never copied
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
            reply = RepoReply.decode(msg.payload, view=True)  # a view into the packet paho read (``payload_views``)
        except WireError:
            return  # not ours to answer; the request it belonged to will time out and be retried
        if self._replies.get(reply.request_id, _ANSWERED) is not None:
            return  # stray, late or a duplicate: not worth hashing (and checked again under the lock)
        # Hashed here, on paho's thread, while the bytes just read are in this core's caches: cheaper than on the
        # writer's thread later (ReceivedChunk); the lock is not held meanwhile. Only what can be a chunk: an error
        # or an oversized reply is refused by ``_await`` or ``_stream`` and never written.
        chunk = ReceivedChunk(reply.data) if reply.status == 200 and len(reply.data) <= MAX_CHUNK else None
        arrival = _Arrival(reply, chunk)
        with self._lock:  # never blocks paho's network thread for long; a duplicate (QoS 1 redelivery) is dropped
            if reply.request_id in self._replies and self._replies[reply.request_id] is None:
                self._replies[reply.request_id] = arrival
                self._arrived.notify_all()

    def _send(self, path: str, offset: int) -> str:
        """Ask for the chunk of ``path`` at ``offset``; the request id to await."""
        rid = f"{self._id_prefix}{next(self._ids):x}"
        with self._lock:
            self._replies[rid] = None
        req = RepoRequest(rid, path, offset, self.chunk_size)
        try:
            self._client.publish(self.request_topic, req.encode(), qos=1)
        except BaseException:
            self._forget([rid])
            raise
        return rid

    def _wait(self, rid: str) -> _Arrival | None:
        """The reply to ``rid``, or None after ``timeout`` seconds; either way ``rid`` is no longer awaited."""
        deadline = time.monotonic() + self.timeout
        with self._lock:
            while (reply := self._replies.get(rid)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._arrived.wait(left):
                    reply = self._replies.get(rid)
                    break
            self._replies.pop(rid, None)
        return reply

    def _forget(self, rids: Iterable[str]) -> None:
        """Stop awaiting ``rids``: a late reply to one of them is dropped."""
        with self._lock:
            for rid in rids:
                self._replies.pop(rid, None)

    def _await(self, path: str, offset: int, rid: str) -> _Arrival:
        arrival = self._wait(rid)
        for _ in range(self.retries):
            if arrival is not None:
                break
            arrival = self._wait(self._send(path, offset))
        if arrival is None:
            raise tuf_errors.DownloadError(f"no reply for {path} at offset {offset} after {self.retries + 1} tries")
        reply = arrival.reply
        if reply.status == 404:
            raise tuf_errors.DownloadHTTPError(f"{path}: not found", 404)
        if reply.status != 200:
            raise tuf_errors.DownloadHTTPError(f"{path}: {reply.error or 'error'}", reply.status)
        if reply.offset != offset:
            raise tuf_errors.DownloadError(f"{path}: reply for offset {reply.offset}, expected {offset}")
        return arrival

    def _path(self, url: str) -> str:
        if not url.startswith(self.base_url):
            raise tuf_errors.DownloadHTTPError(f"{url} is outside {self.base_url}", 404)
        return url[len(self.base_url) :]

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self._path(url)
        first = self._await(path, 0, self._send(path, 0))
        return (bytes(block.data) for block in self._stream(path, first, first.reply.total))  # metadata: python-tuf's bytes

    def read_range(self, url: str, offset: int, size: int) -> Iterator[ReceivedChunk]:
        """Bytes ``offset..size`` of a file whose signed length is ``size``; another size on the server is an error."""
        path = self._path(url)
        first = self._await(path, offset, self._send(path, offset))
        if first.reply.total != size:
            raise tuf_errors.DownloadLengthMismatchError(f"{path}: {first.reply.total} bytes on the server, the signed length is {size}")
        return self._stream(path, first, size)

    def _stream(self, path: str, first: _Arrival, total: int) -> Iterator[ReceivedChunk]:
        yield first.chunk or ReceivedChunk(first.reply.data)  # an oversized first reply: hashed here, refused by length
        offset = first.reply.offset + len(first.reply.data)
        inflight: deque[tuple[int, str]] = deque()
        next_offset = offset
        window = AdaptiveWindow(self.window, self.window_max)
        try:
            while offset < total:
                while len(inflight) < window.size and next_offset < total:
                    inflight.append((next_offset, self._send(path, next_offset)))
                    next_offset += self.chunk_size
                chunk_offset, sent = inflight.popleft()
                arrival = self._await(path, chunk_offset, sent)
                reply = arrival.reply
                if len(reply.data) != min(self.chunk_size, total - chunk_offset) or reply.total != total:
                    raise tuf_errors.DownloadError(f"{path}: chunk at {chunk_offset} has {len(reply.data)} bytes (file {reply.total})")
                offset = chunk_offset + len(reply.data)
                window.arrived(len(reply.data))
                yield arrival.chunk or ReceivedChunk(reply.data)  # (never None: its length was just checked)
        finally:  # an abandoned stream (length cap hit, error) must not leave waiters for late replies
            self.last_window = window.size
            self._forget(rid for _, rid in inflight)


class AdaptiveWindow:
    """How many chunk requests to keep in flight: from ``start``, doubled while a round of replies (one window's
    worth) at the new size arrives at least ``GAIN`` times faster than the best round so far, never past ``cap``;
    at the first doubling that does not pay it goes back to the best size and stays. Why: the round trip a window
    must cover differs per network (a LAN, a cellular link, a loaded controller) and one fixed number is too small
    for some and only costs memory and fairness for others; the cap bounds both (and stays under the repository
    server's per-device line, ``MAX_PENDING``)."""

    GAIN = 1.1

    def __init__(self, start: int, cap: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = max(1, start)
        self.cap = max(self.size, cap)
        self._clock = clock
        self._best_rate = 0.0
        self._best_size = self.size
        self._settled = self.size >= self.cap
        self._round_start: float | None = None
        self._round_bytes = 0
        self._round_replies = 0

    def arrived(self, nbytes: int) -> None:
        """One reply of ``nbytes`` arrived; a full round decides whether the window grows."""
        if self._settled:
            return
        now = self._clock()
        if self._round_start is None:  # the first reply starts the clock (its round trip is latency, not rate)
            self._round_start = now
            return
        self._round_bytes += nbytes
        self._round_replies += 1
        if self._round_replies < self.size:
            return
        rate = self._round_bytes / max(now - self._round_start, 1e-9)
        if rate >= self._best_rate * self.GAIN:
            self._best_rate, self._best_size = rate, self.size
            self.size = min(self.cap, self.size * 2)
            self._settled = self.size == self._best_size
        else:
            self.size, self._settled = self._best_size, True
        self._round_start, self._round_bytes, self._round_replies = now, 0, 0


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
# Chunks go to the writer thread WRITE_BATCH at a time: each hand-over wakes it, and a woken thread contends for the GIL
# with paho's (handing over every chunk cost 12% of the throughput, in benchmarks/transfer.py). At most WRITE_QUEUE
# batches wait: bounded memory (2 MiB of 256 KiB chunks, besides the batches being filled and written), and room for
# what arrives during an fsync (4 MiB took 2-3 ms on the benchmark's disk: about 0.5 MiB at 200 MB/s).
WRITE_BATCH = 4
WRITE_QUEUE = 2


class _ChunkWriter:
    """Checks each chunk against the signed list, writes it and fsyncs every ``sync_bytes``, on its own thread.

    Why a thread: with the write and the fsync on the thread that consumes the replies, no request went out while
    they ran and the window drained (an fsync of 4 MiB is milliseconds). The sha256 of an MQTT reply is computed
    earlier, as it arrives (``ReceivedChunk``: cheaper there); a chunk from any other source is hashed here.
    ``progress`` is told each offset right after its fsync, from this thread, so the resume offset never covers a
    byte not fsynced and verified (the job store is shared by the agent's threads behind a lock). After a bad
    chunk or an error the writer takes (and drops) whatever is still queued, so a caller never blocks on a full
    queue; the caller learns of it at its next ``put`` (or at ``finish``), having received at most a few more
    chunks, none of them written."""

    def __init__(self, chunks: ChunkManifest, f: BinaryIO, offset: int, sync_bytes: int, progress: Progress) -> None:
        self.chunks, self.f, self.sync_bytes, self.progress = chunks, f, sync_bytes, progress
        self.offset = self.durable = offset  # end of the verified bytes written; of those fsynced
        self.bad: int | None = None  # offset of a chunk that failed its hash
        self.error: BaseException | None = None
        self._batch: list[tuple[int, Chunk]] = []  # filled by the caller's thread, handed over when full
        self._queue: queue.Queue[list[tuple[int, Chunk]] | None] = queue.Queue(WRITE_QUEUE)
        self._thread = threading.Thread(target=self._run, name="download-writer", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self.bad is not None or self.error is not None

    def put(self, index: int, chunk: Chunk) -> bool:
        """Queue chunk ``index`` (blocks while the queue is full); False once the writer stopped taking chunks."""
        if self.stopped:
            return False
        self._batch.append((index, chunk))
        if len(self._batch) >= WRITE_BATCH:
            self._queue.put(self._batch)
            self._batch = []
        return True

    def finish(self) -> None:
        """Write what is queued, fsync, stop; the writer's error (a full disk) is raised here, on the caller's thread."""
        if self._batch:
            self._queue.put(self._batch)
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            for item in batch:
                if not self.stopped:
                    self._guarded(self._write, *item)
        if not self.stopped:
            self._guarded(self._sync)

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        try:
            step(*args)
        except BaseException as exc:  # raised again by finish(), on the caller's thread
            self.error = exc

    def _write(self, index: int, chunk: Chunk) -> None:
        if not self.chunks.check(index, chunk):
            self._sync()
            self.bad = self.offset
            return
        data = chunk.data if isinstance(chunk, ReceivedChunk) else chunk
        self.f.write(data)
        self.offset += len(data)
        if self.offset - self.durable >= self.sync_bytes:
            self._sync()

    def _sync(self) -> None:
        """Make the verified bytes durable, then (only then) record how far they go."""
        if self.offset != self.durable:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.durable = self.offset
            self.progress(self.offset)


class DiskFull(EdgefleetError):
    code = "disk_full"


class ChunkSource(Protocol):
    def read_range(self, url: str, offset: int, size: int) -> Iterator[Chunk]: ...


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
    ended), or None when done. Transport errors propagate as python-tuf's ``DownloadError``s, after the chunks
    already received are written (every byte written is a verified chunk: ``f.tell()`` is where to resume)."""
    writer = _ChunkWriter(update.chunks, f, offset, sync_bytes, progress)
    stream: Iterator[Chunk] | None = None
    pending = bytearray()
    try:
        stream = source.read_range(update.url, offset, update.length)
        index = offset // update.chunks.chunk_size
        for data in stream:
            for chunk in _whole_chunks(update.chunks, index, data, pending):
                if not writer.put(index, chunk):
                    break
                index += 1
            if writer.stopped:
                break
    finally:
        close = getattr(stream, "close", None)  # a generator: stop its in-flight requests
        if close is not None:
            close()
        writer.finish()
    if writer.bad is not None:
        return writer.bad
    if writer.offset != update.length or pending:
        return writer.offset  # the stream ended early or ran long: ask again from the last good chunk
    return None


def _whole_chunks(chunks: ChunkManifest, index: int, data: Chunk, pending: bytearray) -> list[Chunk]:
    """The chunks ``data`` completes from chunk ``index`` on; the rest waits in ``pending`` for the next block (and a
    chunk put together from several blocks is hashed by the writer, not on arrival)."""
    whole = data.data if isinstance(data, ReceivedChunk) else data
    if not pending and index < len(chunks.sha256) and len(whole) == chunks.chunk_length(index):
        return [data]  # the usual case: one reply is one chunk, no copying
    pending += whole
    ready: list[Chunk] = []
    while index + len(ready) < len(chunks.sha256) and len(pending) >= chunks.chunk_length(index + len(ready)):
        n = chunks.chunk_length(index + len(ready))
        ready.append(bytes(pending[:n]))
        del pending[:n]
    return ready
