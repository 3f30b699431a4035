"""MQTT topics and message formats; one place, shared by the agent and the controller.

Works on MQTT 3.1.1 and 5: correlation ids and reply topics travel in the payload.
Repository replies are binary: a JSON header, a newline, then the raw bytes, so a
256 KiB chunk is not inflated by base64.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import Any

ROOT = "edgefleet/v1"
REPO_REQUEST = f"{ROOT}/repo/req"
MAX_CHUNK = 256 * 1024
MAX_PATH = 512
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REPO_PATH = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")  # '+' as in versions like 1.0+build5
REPLY_TOPIC = re.compile(rf"^{ROOT}/dev/[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}/repo/reply$")


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says what is wrong."""


def valid_device_id(device_id: str) -> str:
    if not _DEVICE_ID.match(device_id):
        raise ProtocolError(f"bad device id {device_id!r}")
    return device_id


def repo_reply_topic(device_id: str) -> str:
    return f"{ROOT}/dev/{valid_device_id(device_id)}/repo/reply"


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
        if len(payload) > 4096:
            raise ProtocolError("request too large")
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"not JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) - {"request_id", "reply_to", "path", "offset", "length"}:
            raise ProtocolError("expected an object with request_id, reply_to, path, offset, length")
        try:
            req = cls(
                str(data["request_id"]),
                str(data["reply_to"]),
                str(data["path"]),
                int(data.get("offset", 0)),
                int(data.get("length", MAX_CHUNK)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"bad field: {exc}") from None
        if not REPLY_TOPIC.match(req.reply_to):
            raise ProtocolError(f"reply_to must be {ROOT}/dev/<id>/repo/reply")
        if len(req.path) > MAX_PATH or not _REPO_PATH.match(req.path) or ".." in req.path.split("/"):
            raise ProtocolError(f"bad path {req.path[:80]!r}")
        if req.offset < 0 or not 0 < req.length <= MAX_CHUNK or len(req.request_id) > 64:
            raise ProtocolError("offset must be >= 0, 0 < length <= 256 KiB, request_id <= 64 chars")
        return req


def reply_address(payload: bytes) -> tuple[str, str] | None:
    """(request_id, reply_to) of a request that failed validation, when both are usable for a 400 answer."""
    try:
        data = json.loads(payload) if len(payload) <= 4096 else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    rid, reply_to = data.get("request_id"), data.get("reply_to")
    if isinstance(rid, str) and len(rid) <= 64 and isinstance(reply_to, str) and REPLY_TOPIC.match(reply_to):
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
            raise ProtocolError("reply without header")
        try:
            h: dict[str, Any] = json.loads(head)
            return cls(
                str(h["request_id"]), int(h["status"]), int(h.get("total", 0)), int(h.get("offset", 0)), data, str(h.get("error", ""))
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"bad reply header: {exc}") from None


def tcp_nodelay(client: Any, userdata: Any, sock: Any) -> None:
    """paho ``on_socket_open``: Nagle adds 44-88 ms per request/reply round trip (DESIGN.md), so turn it off."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (websockets, unix): nothing to do
        pass


def device_topic(device_id: str, *parts: str) -> str:
    """``edgefleet/v1/dev/{id}/...``: every per-device topic (status, reported, director, cmd, jobs, telemetry)."""
    return "/".join((ROOT, "dev", valid_device_id(device_id), *parts))


MAX_COMMAND = 16 * 1024


@dataclass(frozen=True)
class Command:
    """A controller → device command on ``dev/{id}/cmd``; the answer goes to ``dev/{id}/cmd/reply``."""

    request_id: str
    command: str  # rollback | check | ping
    args: dict[str, Any]

    @classmethod
    def decode(cls, payload: bytes) -> Command:
        if len(payload) > MAX_COMMAND:
            raise ProtocolError(f"command of {len(payload)} bytes is over the {MAX_COMMAND}-byte limit")
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("command"), str):
            raise ProtocolError("expected an object with a 'command' string")
        rid = data.get("request_id", "")
        args = data.get("args", {})
        if not isinstance(rid, str) or len(rid) > 64 or not isinstance(args, dict):
            raise ProtocolError("request_id must be a string (<= 64 chars) and args an object")
        return cls(rid, data["command"], args)

    def encode(self) -> bytes:
        return json.dumps({"request_id": self.request_id, "command": self.command, "args": self.args}).encode()
