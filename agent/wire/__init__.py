"""The wire contract: every message between devices, the controller and applications, as one typed model.

The agent, ``fleet simulate``, the ingest, the store, the CLI and the dashboard encode and
decode through these and nothing else; decoding is where hostile input stops (``codec``).
"""

from agent.wire.codec import WireError, WireModel, decode, encode, load_json
from agent.wire.commands import Command, CommandReply, ErrorBody
from agent.wire.device import InstalledVersion, JobUpdate, Reported, ReportedModel, ReportedShadow, Status, UpdateCheck, UpdateState
from agent.wire.repo import MAX_CHUNK, RepoReply, RepoRequest, readable_request_id
from agent.wire.telemetry import CLIENT_ERRORS, SERVER_ERRORS, ModelWindow, PredictionSums, ShadowWindow, SystemMetrics, TelemetryBatch
from agent.wire.topics import (
    REPO_REQUESTS,
    ROOT,
    DeviceTopic,
    device_filter,
    device_topic,
    parse_device_topic,
    parse_repo_request_topic,
    repo_reply_topic,
    repo_request_topic,
    valid_device_id,
)

__all__ = [
    "CLIENT_ERRORS",
    "MAX_CHUNK",
    "REPO_REQUESTS",
    "ROOT",
    "SERVER_ERRORS",
    "Command",
    "CommandReply",
    "ErrorBody",
    "InstalledVersion",
    "DeviceTopic",
    "JobUpdate",
    "ModelWindow",
    "PredictionSums",
    "RepoReply",
    "RepoRequest",
    "Reported",
    "ReportedModel",
    "ReportedShadow",
    "ShadowWindow",
    "Status",
    "SystemMetrics",
    "TelemetryBatch",
    "UpdateCheck",
    "UpdateState",
    "WireError",
    "WireModel",
    "decode",
    "decode_device_message",
    "device_filter",
    "device_topic",
    "encode",
    "load_json",
    "parse_device_topic",
    "parse_repo_request_topic",
    "readable_request_id",
    "repo_reply_topic",
    "repo_request_topic",
    "valid_device_id",
]

_DEVICE_MESSAGES: dict[str, type[WireModel]] = {"status": Status, "reported": Reported, "telemetry": TelemetryBatch}


def decode_device_message(topic: DeviceTopic, payload: bytes) -> WireModel:
    """What a device published on one of its own topics, typed; ``WireError`` for anything else.

    The id inside a message must be the id in its topic: the topic is what the broker's ACL
    confines, so a message about another device is refused.
    """
    if topic.kind == "jobs":
        message: WireModel = decode(UpdateCheck if topic.name == "check" else JobUpdate, payload)
    elif topic.kind in _DEVICE_MESSAGES and not topic.rest:
        message = decode(_DEVICE_MESSAGES[topic.kind], payload)
    else:
        raise WireError(f"no device message on {topic.kind}/{'/'.join(topic.rest)}"[:200])
    claimed = getattr(message, "device_id", topic.device)
    if claimed != topic.device:
        raise WireError(f"a message on {topic.device}'s topic names {claimed}")
    return message
