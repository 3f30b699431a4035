"""Update jobs: the states a job can be in, which state may follow which, and the ``Job`` itself.

The transitions are data (``TRANSITIONS``) so that what the machine may do can be read in one place and
checked in one place (``check_transition``), and a test can walk the whole table. The state values are the
strings persisted in SQLite and published on ``dev/{id}/jobs/{job}``, so they never change.

A ``Job`` holds the ``VerifiedUpdate`` it installs — what both repositories agreed on when it started —
rather than a copy of its fields: the download and the checks use exactly what was verified.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import EdgefleetError
from agent.update.verify import VerifiedUpdate

__all__ = ["FINAL", "TRANSITIONS", "IllegalTransition", "Job", "State", "check_transition"]


class State(str, enum.Enum):
    """A job's state; the value is what SQLite and the wire hold (``enum.StrEnum`` is 3.11+, the agent runs on 3.10)."""

    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    HEALTH_CHECK = "HEALTH_CHECK"
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    ROLLED_BACK = "ROLLED_BACK"
    SHADOW = "SHADOW"  # a shadow job's success: loaded and health-checked beside the active version, answering nobody

    def __str__(self) -> str:  # in logs and f-strings: ``ACTIVE``, not ``State.ACTIVE``
        return self.value


FINAL = frozenset({State.ACTIVE, State.FAILED, State.REJECTED, State.ROLLED_BACK, State.SHADOW})

# Any unfinished job may fail (its own storage, a newer target superseding it) or be rejected (the artifact).
_ENDS = frozenset({State.FAILED, State.REJECTED})

TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.IDLE: frozenset({State.DOWNLOADING, State.STAGED}) | _ENDS,  # STAGED: the bytes are installed already
    State.DOWNLOADING: frozenset({State.VERIFYING}) | _ENDS,
    State.VERIFYING: frozenset({State.STAGED}) | _ENDS,
    State.STAGED: frozenset({State.HEALTH_CHECK, State.IDLE}) | _ENDS,  # IDLE: the staged files were lost, fetch again
    State.HEALTH_CHECK: frozenset({State.ACTIVE, State.SHADOW}) | _ENDS,
    State.ACTIVE: frozenset({State.ROLLED_BACK}),
    State.SHADOW: frozenset(),
    State.FAILED: frozenset(),
    State.REJECTED: frozenset(),
    State.ROLLED_BACK: frozenset(),
}

# The job's outcome as the controller reads it (``JobUpdate.status``).
_STATUS = {
    State.ACTIVE: "SUCCEEDED",
    State.SHADOW: "SUCCEEDED",
    State.FAILED: "FAILED",
    State.REJECTED: "REJECTED",
    State.ROLLED_BACK: "ROLLED_BACK",
}


class IllegalTransition(EdgefleetError):
    """A move the table does not allow: a bug in the machine, never a property of the update."""

    code = "illegal_transition"


def check_transition(current: State, to: State) -> None:
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(f"a job in {current.value} cannot go to {to.value}")


@dataclass
class Job:
    id: str
    update: VerifiedUpdate  # as verified when the job started
    created: float
    shadow: bool = False  # install to run beside the active version on live inputs (shadow mode), not to serve
    state: State = State.IDLE
    offset: int = 0  # bytes of the artifact downloaded, verified and fsynced
    reason: str = ""
    attempts: int = 0  # times this job was resumed in HEALTH_CHECK: a model that kills the agent must not loop
    updated: float = 0.0

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def report(self) -> dict[str, Any]:
        """The job as published on ``dev/{id}/jobs/{job}`` (``agent.wire.JobUpdate``)."""
        u = self.update
        return {
            "id": self.id,
            "target_path": u.target_path,
            "model": u.model,
            "version": u.version,
            "variant": u.variant,
            "release_counter": u.release_counter,
            "length": u.length,
            "sha256": u.sha256,
            "state": self.state.value,
            "offset": self.offset,
            "reason": self.reason,
            "attempts": self.attempts,
            "created": self.created,
            "updated": self.updated,
            "shadow": int(self.shadow),
            "status": _STATUS.get(self.state, "IN_PROGRESS"),
        }
