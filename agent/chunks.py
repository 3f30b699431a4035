"""Per-chunk sha256 list of an artifact, so a device verifies every chunk as it arrives.

Why: the signed sha256 of a 50 MiB variant only says at the very end that
something was wrong. With the chunk list (itself a signed target, fetched and
verified through the image repository) a corrupted or truncated chunk is caught
on arrival and re-requested, and a download interrupted by a restart resumes from
the last chunk that verified — never from bytes nobody checked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from agent.errors import EdgefleetError

__all__ = ["CHUNKS_SUFFIX", "CHUNK_SIZE", "Chunk", "ChunkManifest", "ChunkManifestError", "ReceivedChunk"]

CHUNK_SIZE = 256 * 1024
CHUNKS_SUFFIX = ".chunks"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # 60k chunks, a 15 GiB artifact


class ChunkManifestError(EdgefleetError):
    code = "bad_chunk_manifest"


@dataclass(frozen=True, slots=True)
class ReceivedChunk:
    """A chunk's bytes with the sha256 this device computed from them as they arrived.

    Why: hashed where it is received, while its bytes are still in that core's caches, a 256 KiB chunk cost the
    download less than hashed again on the writer's thread (verified download 0.78-0.80 of raw pub/sub hashed on the
    writer, 0.82-0.86 hashed on arrival: benchmarks/transfer.py). The digest is never a peer's claim nor a caller's:
    it is computed here, from the bytes held, and those must not change after it (the MQTT fetcher's are a read-only
    view into a packet no one else holds)."""

    data: bytes | memoryview
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.data).hexdigest())


Chunk = bytes | memoryview | ReceivedChunk  # what a download's sources yield: MQTT replies arrive as ReceivedChunks


@dataclass(frozen=True)
class ChunkManifest:
    length: int
    chunk_size: int
    sha256: tuple[str, ...]

    @classmethod
    def of(cls, data: bytes, chunk_size: int = CHUNK_SIZE) -> ChunkManifest:
        digests = tuple(hashlib.sha256(data[i : i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size))
        return cls(len(data), chunk_size, digests)

    def encode(self) -> bytes:
        return json.dumps({"length": self.length, "chunk_size": self.chunk_size, "sha256": list(self.sha256)}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ChunkManifest:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ChunkManifestError(f"chunk manifest of {len(raw)} bytes is over the {MAX_MANIFEST_BYTES} limit")
        try:
            data = json.loads(raw)
            m = cls(int(data["length"]), int(data["chunk_size"]), tuple(str(h) for h in data["sha256"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ChunkManifestError(f"malformed chunk manifest: {exc}") from None
        expected = -(-m.length // m.chunk_size) if m.chunk_size > 0 else -1
        if m.length < 0 or m.chunk_size <= 0 or len(m.sha256) != expected:
            raise ChunkManifestError(f"chunk manifest lists {len(m.sha256)} chunks for {m.length} bytes in {m.chunk_size}-byte chunks")
        return m

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.length - index * self.chunk_size)

    def check(self, index: int, data: bytes | memoryview | ReceivedChunk) -> bool:
        """Whether ``data`` is chunk ``index`` as signed: its length and its sha256 (computed on arrival where it is a
        ``ReceivedChunk``, here otherwise)."""
        if isinstance(data, ReceivedChunk):
            return len(data.data) == self.chunk_length(index) and data.sha256 == self.sha256[index]
        return len(data) == self.chunk_length(index) and hashlib.sha256(data).hexdigest() == self.sha256[index]
