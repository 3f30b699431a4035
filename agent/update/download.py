"""Fetch a verified update's artifact: chunk by chunk, each checked on arrival, resumable after a crash.

The partial file only ever holds chunks whose sha256 matched the signed chunk list,
and the offset reported to ``progress`` (every 4 MiB and at the end) covers only bytes
already fsynced — so after ``kill -9`` the download restarts from that offset and nothing
unchecked is kept. A chunk that does not match (corrupted, truncated) is requested
again; a transport error (broker restart) raises ``RepositoryUnreachable`` so the
caller retries later from the same offset; a full disk raises ``DiskFull``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from tuf.api import exceptions as tuf_errors

from agent import logs
from agent.errors import EdgefleetError
from agent.update.verify import RepositoryUnreachable, UpdateRejected, VerifiedUpdate

__all__ = ["ChunkSource", "DiskFull", "check_disk_space", "download"]

log = logging.getLogger("edgefleet.download")


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
    """Continue ``dest`` from ``offset`` (a chunk boundary already verified) to the signed length."""
    chunks = update.chunks
    if offset % chunks.chunk_size or offset > update.length:
        offset = 0  # not a state we wrote: start over rather than trust it
    failures = 0
    try:
        with open(dest, "ab") as f:  # create if missing, never truncate what verified
            pass
        with open(dest, "r+b") as f:
            f.truncate(offset)
            f.seek(offset)
            while offset < update.length:
                bad = _fill(update, source, f, offset, progress, sync_bytes)
                if bad is None:
                    break
                offset = bad
                failures += 1
                logs.event(log, "download.bad_chunk", logging.WARNING, target=update.target_path, offset=offset, attempt=failures)
                if failures > chunk_retries:
                    raise UpdateRejected(f"{update.target_path}: the chunk at offset {offset} failed its signed sha256 {failures} times")
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            dest.unlink(missing_ok=True)
            raise DiskFull(f"disk full while writing {dest.name}: {exc.strerror}") from exc
        raise


def _fill(
    update: VerifiedUpdate, source: ChunkSource, f: BinaryIO, offset: int, progress: Callable[[int], None], sync_bytes: int
) -> int | None:
    """Write verified chunks from ``offset``; the offset of a chunk that failed its hash, or None when done."""
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
    except tuf_errors.DownloadLengthMismatchError as exc:
        raise UpdateRejected(str(exc)) from exc
    except tuf_errors.DownloadHTTPError as exc:
        if exc.status_code == 404:
            raise UpdateRejected(f"{update.target_path}: not on the repository server") from exc
        raise RepositoryUnreachable(f"{update.target_path}: {exc}") from exc
    except tuf_errors.DownloadError as exc:
        raise RepositoryUnreachable(f"{update.target_path} at offset {offset}: {exc}") from exc
    finally:
        close = getattr(stream, "close", None)  # a generator: stop its in-flight requests
        if close is not None:
            close()
