"""Repository requests and replies: a device pulls metadata and chunks through the controller's server.

Replies are binary: a JSON header, a newline, then the raw bytes, so a 256 KiB chunk is
not inflated by base64.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from agent.wire.codec import WireError, load_json
from agent.wire.topics import DEVICE_ID, ROOT

__all__ = ["MAX_CHUNK", "MAX_PATH", "REPLY_TOPIC", "RepoReply", "RepoRequest", "reply_address"]

MAX_CHUNK = 256 * 1024
MAX_PATH = 512
MAX_REQUEST = 4096
MAX_REPLY_HEADER = 4096
_REPO_PATH = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")  # '+' as in versions like 1.0+build5
REPLY_TOPIC = re.compile(rf"^{ROOT}/dev/{DEVICE_ID}/repo/reply$")


@dataclass(frozen=True)
class RepoRequest:
    """Ask for ``length`` bytes of ``path`` (relative to the repository root) from ``offset``."""

    request_id: str
    reply_to: str
    path: str
    offset: int = 0
    length: int = MAX_CHUNK

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> RepoRequest:
        data = load_json(payload, MAX_REQUEST)
        if not isinstance(data, dict) or set(data) - {"request_id", "reply_to", "path", "offset", "length"}:
            raise WireError("expected an object with request_id, reply_to, path, offset, length")
        try:
            fields = (data["request_id"], data["reply_to"], data["path"], data.get("offset", 0), data.get("length", MAX_CHUNK))
        except KeyError as exc:
            raise WireError(f"missing field {exc}") from None
        if not all(isinstance(f, str) for f in fields[:3]) or not all(type(f) is int for f in fields[3:]):
            raise WireError("request_id, reply_to and path must be strings, offset and length integers")
        req = cls(*fields)
        if not REPLY_TOPIC.fullmatch(req.reply_to):
            raise WireError(f"reply_to must be {ROOT}/dev/<id>/repo/reply")
        if len(req.path) > MAX_PATH or not _REPO_PATH.fullmatch(req.path) or ".." in req.path.split("/"):
            raise WireError(f"bad path {req.path[:80]!r}")
        if req.offset < 0 or req.offset >= 2**63 or not 0 < req.length <= MAX_CHUNK or len(req.request_id) > 64:
            raise WireError("offset must be >= 0, 0 < length <= 256 KiB, request_id <= 64 chars")
        return req


def reply_address(payload: bytes) -> tuple[str, str] | None:
    """(request_id, reply_to) of a request that failed validation, when both are usable for a 400 answer."""
    try:
        data = load_json(payload, MAX_REQUEST)
    except WireError:
        return None
    if not isinstance(data, dict):
        return None
    rid, reply_to = data.get("request_id"), data.get("reply_to")
    if isinstance(rid, str) and len(rid) <= 64 and isinstance(reply_to, str) and REPLY_TOPIC.fullmatch(reply_to):
        return rid, reply_to
    return None


@dataclass(frozen=True)
class RepoReply:
    request_id: str
    status: int  # 200, 400, 404, 416 (offset past the end), 500
    total: int = 0  # file size
    offset: int = 0
    data: bytes = b""
    error: str = ""

    def encode(self) -> bytes:
        header = {"request_id": self.request_id, "status": self.status, "total": self.total, "offset": self.offset, "error": self.error}
        return json.dumps(header, separators=(",", ":")).encode() + b"\n" + self.data

    @classmethod
    def decode(cls, payload: bytes) -> RepoReply:
        head, sep, data = payload.partition(b"\n")
        if not sep:
            raise WireError("reply without header")
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
