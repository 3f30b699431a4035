"""Controller → device commands on ``dev/{id}/cmd``; the answer goes to ``dev/{id}/cmd/reply``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.wire.codec import WireError, WireModel, load_json
from agent.wire.fields import Code, Name, Text

__all__ = ["MAX_COMMAND", "Command", "CommandReply", "ErrorBody"]

MAX_COMMAND = 16 * 1024


@dataclass(frozen=True)
class Command:
    request_id: str
    command: str  # rollback | check | ping
    args: dict[str, Any]

    @classmethod
    def decode(cls, payload: bytes) -> Command:
        data = load_json(payload, MAX_COMMAND, max_depth=8)
        if not isinstance(data, dict) or not isinstance(data.get("command"), str) or len(data["command"]) > 64:
            raise WireError("expected an object with a 'command' string")
        rid = data.get("request_id", "")
        args = data.get("args", {})
        if not isinstance(rid, str) or len(rid) > 64 or not isinstance(args, dict):
            raise WireError("request_id must be a string (<= 64 chars) and args an object")
        return cls(rid, data["command"], args)

    def encode(self) -> bytes:
        return json.dumps({"request_id": self.request_id, "command": self.command, "args": self.args}).encode()


class ErrorBody(WireModel):
    code: Code
    message: Text


class CommandReply(WireModel):
    """``dev/{id}/cmd/reply``: the command's result, or a typed error."""

    MAX_BYTES: ClassVar[int] = 64 * 1024
    request_id: Name = ""
    command: Name = ""
    ok: bool
    result: Any = None
    error: ErrorBody | None = None
