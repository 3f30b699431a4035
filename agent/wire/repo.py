"""Repository requests and replies: a device pulls metadata and chunks through the controller's server.

A request goes to ``repo/req/{device id}`` and its reply to that device's own
``dev/{id}/repo/reply``: the server derives the reply topic from the request topic
(which the broker's ACL confines), never from the payload, so no device can aim replies
at another. Replies are binary: a JSON header, a newline, then the raw bytes, so a
256 KiB chunk is not inflated by base64.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from agent.wire.codec import WireError, load_json

__all__ = ["MAX_CHUNK", "MAX_PATH", "RepoReply", "RepoRequest", "readable_request_id"]

MAX_CHUNK = 256 * 1024
MAX_PATH = 512
MAX_REQUEST = 4096
MAX_REPLY_HEADER = 4096
_REPO_PATH = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")  # '+' as in versions like 1.0+build5


@dataclass(frozen=True)
class RepoRequest:
    """Ask for ``length`` bytes of ``path`` (relative to the repository root) from ``offset``."""

    request_id: str
    path: str
    offset: int = 0
    length: int = MAX_CHUNK

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> RepoRequest:
        data = load_json(payload, MAX_REQUEST)
        if not isinstance(data, dict) or set(data) - {"request_id", "path", "offset", "length"}:
            raise WireError("expected an object with request_id, path, offset, length (the reply topic comes from the request topic)")
        try:
            fields = (data["request_id"], data["path"], data.get("offset", 0), data.get("length", MAX_CHUNK))
        except KeyError as exc:
            raise WireError(f"missing field {exc}") from None
        if not all(isinstance(f, str) for f in fields[:2]) or not all(type(f) is int for f in fields[2:]):
            raise WireError("request_id and path must be strings, offset and length integers")
        req = cls(*fields)
        if len(req.path) > MAX_PATH or not _REPO_PATH.fullmatch(req.path) or ".." in req.path.split("/"):
            raise WireError(f"bad path {req.path[:80]!r}")
        if req.offset < 0 or req.offset >= 2**63 or not 0 < req.length <= MAX_CHUNK or len(req.request_id) > 64:
            raise WireError("offset must be >= 0, 0 < length <= 256 KiB, request_id <= 64 chars")
        return req


def readable_request_id(payload: bytes) -> str | None:
    """The request_id of a request that failed validation, when it is usable for a 400 answer."""
    try:
        data = load_json(payload, MAX_REQUEST)
    except WireError:
        return None
    rid = data.get("request_id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 64 else None


@dataclass(frozen=True)
class RepoReply:
    request_id: str
    status: int  # 200, 400, 404, 416 (offset past the end), 500
    total: int = 0  # file size
    offset: int = 0
    data: bytes | memoryview = field(default=b"", hash=False)  # a memoryview into the payload with ``view=True``
    error: str = ""
    # The encoded reply, when ``data`` is the room at its end (``with_room``): what ``encode`` returns, as it is.
    frame: bytearray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def with_room(cls, request_id: str, total: int, offset: int, length: int) -> RepoReply:
        """A 200 reply whose ``data`` is ``length`` bytes of room at the end of its encoded form, for the caller to fill
        in place (``os.preadv``). Why: the repository server then reads a chunk straight into the message instead of
        into bytes that ``encode`` copies again (a 256 KiB copy per chunk, on a thread holding the GIL)."""
        header = cls(request_id, 200, total, offset)._header()
        frame = bytearray(len(header) + length)
        frame[: len(header)] = header
        return cls(request_id, 200, total, offset, memoryview(frame)[len(header) :], frame=frame)

    def encode(self) -> bytes | bytearray:
        header = self._header()
        frame = self.frame  # as it is, while it still is this reply (not one copied with another header or data)
        if frame is not None and isinstance(self.data, memoryview) and self.data.obj is frame and frame.startswith(header):
            if len(frame) == len(header) + len(self.data):
                return frame
        return header + self.data

    def _header(self) -> bytes:
        header = {"request_id": self.request_id, "status": self.status, "total": self.total, "offset": self.offset, "error": self.error}
        return json.dumps(header, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview, view: bool = False) -> RepoReply:
        """``view``: the data is a read-only memoryview into ``payload`` instead of a copy (a 256 KiB chunk, per chunk):
        the fetcher hashes it on arrival and writes it later, so nothing may write through it."""
        head = bytes(payload[: MAX_REPLY_HEADER + 1])  # where the header must end: a copy of 4 KiB at most
        end = head.find(b"\n")
        if end < 0:
            raise WireError("reply without header" if len(payload) <= MAX_REPLY_HEADER else f"reply header over {MAX_REPLY_HEADER} bytes")
        head = head[:end]
        data = memoryview(payload).toreadonly()[end + 1 :] if view else bytes(payload[end + 1 :])
        h: Any = load_json(head, MAX_REPLY_HEADER)
        try:
            reply = cls(
                str(h["request_id"]), int(h["status"]), int(h.get("total", 0)), int(h.get("offset", 0)), data, str(h.get("error", ""))
            )
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise WireError(f"bad reply header: {exc}") from None
        if reply.total < 0 or reply.offset < 0:
            raise WireError("bad reply header: negative total or offset")
        return reply
