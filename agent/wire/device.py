"""What a device says about itself: ``status`` (retained, will = lost), ``reported`` (retained), job updates."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from agent.wire.codec import WireModel
from agent.wire.fields import Count, Id, Name, Text, Timestamp

__all__ = ["InstalledVersion", "JobUpdate", "UpdateCheck", "Reported", "ReportedModel", "ReportedShadow", "Status", "UpdateState"]

Session = Annotated[int, Field(ge=0, le=2**62)]


class Status(WireModel):
    """``dev/{id}/status``: ready, disconnected (a clean stop) or lost (the will); ``session`` orders them."""

    MAX_BYTES: ClassVar[int] = 1024
    state: Literal["ready", "disconnected", "lost"]
    session: Session
    ts: Timestamp | None = None

    def denies(self, session: int) -> bool:
        """This is the will of the run ``session``. Read by that run while it is still connected, it is the will of
        one of its earlier connections that landed after its ``ready``. (``disconnected`` is only ever said by the
        run itself as it stops: not a contradiction.)"""
        return self.session == session and self.state == "lost"


class UpdateState(WireModel):
    """The last update round's outcome, as the device saw it."""

    state: Name
    reason: Text = ""
    job: Name | None = None
    target: Text | None = None
    ts: Timestamp | None = None


class ReportedShadow(WireModel):
    version: Name
    variant: Name
    sha256: Name
    runtime: Name


class ReportedModel(WireModel):
    version: Name
    variant: Name
    sha256: Name
    runtime: Name
    device: Name
    passed_over: Annotated[list[Text], Field(max_length=16)] = []
    shadow: ReportedShadow | None = None


class InstalledVersion(WireModel):
    model: Name
    version: Name
    variant: Name
    status: Name


class Reported(WireModel):
    """``dev/{id}/reported``: hardware, runtimes, what it serves and keeps, which variants suit it best."""

    MAX_BYTES: ClassVar[int] = 256 * 1024
    device_id: Id
    agent_version: Name
    hardware: Text
    runtimes: Annotated[dict[Name, Name], Field(max_length=16)]
    preferred_variants: Annotated[list[Name], Field(max_length=32)]
    models: Annotated[dict[Name, ReportedModel], Field(max_length=64)]
    installed: Annotated[list[InstalledVersion], Field(max_length=512)]
    update: UpdateState | None = None
    ts: Timestamp
    # The run of the agent that took it (its status ``session``): the registry orders a device's reports by (session,
    # ts), so a replay of an earlier run's report never writes over a later run's, whatever the clocks say, and a
    # later run's report replayed before its status is not taken for an old one. None from agents before 2026-12-05.
    session: Session | None = None


class JobUpdate(WireModel):
    """``dev/{id}/jobs/{job}``: one update job's state, with the reason when it failed."""

    MAX_BYTES: ClassVar[int] = 8 * 1024
    id: Id
    target_path: Text
    model: Name
    version: Name
    variant: Name
    release_counter: Annotated[int, Field(ge=0, le=2**62)]
    length: Annotated[int, Field(ge=0, le=2**62)]
    sha256: Name
    state: Literal["IDLE", "DOWNLOADING", "VERIFYING", "STAGED", "HEALTH_CHECK", "ACTIVE", "SHADOW", "FAILED", "REJECTED", "ROLLED_BACK"]
    status: Literal["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "ROLLED_BACK"]
    offset: Annotated[int, Field(ge=0, le=2**62)]
    reason: Text
    attempts: Count
    created: Timestamp
    updated: Timestamp
    shadow: Annotated[int, Field(ge=0, le=1)]


class UpdateCheck(WireModel):
    """``dev/{id}/jobs/check``: an update round refused before any job started (the director's or image's metadata)."""

    MAX_BYTES: ClassVar[int] = 4 * 1024
    state: Literal["REJECTED"]
    status: Literal["REJECTED"]
    reason: Text
    ts: Timestamp
