"""The topic tree: one builder and one parser. Nothing else splits a topic by index.

``edgefleet/v1/dev/{id}/{kind}[/{rest}]`` for everything about one device, and the
repository server's request topic. A device id is validated wherever a topic is built
or read, so a topic of another shape never reaches a handler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.wire.codec import WireError

__all__ = [
    "DEVICE_ID",
    "REPO_REQUESTS",
    "ROOT",
    "DeviceTopic",
    "device_filter",
    "device_topic",
    "parse_device_topic",
    "parse_repo_request_topic",
    "repo_reply_topic",
    "repo_request_topic",
    "valid_device_id",
]

ROOT = "edgefleet/v1"
REPO_REQUESTS = f"{ROOT}/repo/req/+"  # the repository server's subscription: one topic per device
DEVICE_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_DEVICE_ID = re.compile(rf"^{DEVICE_ID}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a job id or model name inside a topic
KINDS = frozenset({"status", "reported", "telemetry", "jobs", "cmd", "director", "infer", "pred", "repo"})


def valid_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise WireError(f"bad device id {str(device_id)[:80]!r}")
    return device_id


def device_topic(device_id: str, *parts: str) -> str:
    """``edgefleet/v1/dev/{id}/...``: every per-device topic (status, reported, director, cmd, jobs, telemetry, infer)."""
    return "/".join((ROOT, "dev", valid_device_id(device_id), *parts))


def device_filter(*parts: str) -> str:
    """A subscription to one kind of topic of every device: ``edgefleet/v1/dev/+/telemetry``."""
    return "/".join((ROOT, "dev", "+", *parts))


def repo_reply_topic(device_id: str) -> str:
    return device_topic(device_id, "repo", "reply")


def repo_request_topic(device_id: str) -> str:
    """Where a device asks the repository server for a file: its id in the topic, which the broker's ACL confines
    (each device may publish only its own), so the server knows who asks without trusting the payload."""
    return f"{ROOT}/repo/req/{valid_device_id(device_id)}"


def parse_repo_request_topic(topic: str) -> str:
    """The asking device's id from ``edgefleet/v1/repo/req/{id}``; ``WireError`` for any other shape."""
    head, sep, device = topic.partition(f"{ROOT}/repo/req/")
    if head or not sep:
        raise WireError(f"not a repository request topic: {topic[:120]!r}")
    return valid_device_id(device)


@dataclass(frozen=True)
class DeviceTopic:
    """A parsed per-device topic: ``device``, ``kind`` (status, reported, telemetry, jobs, ...) and what follows."""

    device: str
    kind: str
    rest: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The one name after the kind (a job id, a model); ``WireError`` when there is not exactly one."""
        if len(self.rest) != 1 or not _NAME.fullmatch(self.rest[0]):
            raise WireError(f"expected one name after {self.kind!r} in the topic")
        return self.rest[0]


def parse_device_topic(topic: str) -> DeviceTopic:
    """``edgefleet/v1/dev/{id}/{kind}/...`` → DeviceTopic; any other shape is a ``WireError``."""
    head, sep, tail = topic.partition(f"{ROOT}/dev/")
    if head or not sep:
        raise WireError(f"not a device topic: {topic[:120]!r}")
    parts = tail.split("/")
    if len(parts) < 2 or parts[1] not in KINDS:
        raise WireError(f"not a device topic: {topic[:120]!r}")
    return DeviceTopic(valid_device_id(parts[0]), parts[1], tuple(parts[2:]))
