"""Rollouts as the store keeps them: the rollout (spec, state, wave, phase, times) and each device's place in it.

Why here and typed: the rollout engine is stateless between ticks — everything it knows about a
rollout is these two records, read at the start of a tick and written at its end, so a
controller restarted mid-rollout goes on where it was. The spec is kept as the JSON the
engine gave (``RolloutSpec.to_json``); the store does not interpret it. Nothing here locks or
opens transactions: ``FleetStore`` does, around these calls.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fleet.store import schema
from fleet.store.db import Database

__all__ = ["DeviceChange", "PlannedDevice", "Rollout", "RolloutDevice", "Rollouts"]


@dataclass(frozen=True)
class Rollout:
    id: int
    spec: dict[str, Any]  # RolloutSpec.to_json()
    state: str  # running, paused, aborting, done, aborted
    wave: int  # the current wave, from 0
    reason: str  # why it ended or was aborted
    created: float
    updated: float
    wave_started: float
    wave_done: float  # when every device of the wave settled; 0 until then
    phase: str  # "shadow" while the first wave runs the new version in shadow, else ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RolloutDevice:
    """One device in a rollout: its wave, its state (pending, assigned, active, shadowing, failed, timeout, rolled_back)."""

    device: str
    wave: int
    state: str
    previous: str  # the version it ran when the rollout started ("" none): what a rollback points it back at
    variant: str  # the variant of the new version it gets
    assigned_at: float  # when it was pointed at the new version; 0: never
    reason: str
    hardware: str  # as the device reported it when the rollout started: what the gates group by

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlannedDevice:
    """A device as a new rollout takes it in (``fleet.rollout.plan``): it starts pending."""

    device: str
    previous: str
    variant: str
    hardware: str


@dataclass(frozen=True)
class DeviceChange:
    """A rollout device's new state; ``assigned_at`` None keeps the stored one."""

    device: str
    state: str
    reason: str = ""
    assigned_at: float | None = None


_ROLLOUT_COLUMNS = next(t for t in schema.TABLES if t.name == "rollouts").columns
_DEVICE_COLUMNS = ", ".join(name for name in RolloutDevice.__dataclass_fields__)


def _rollout(row: dict[str, Any]) -> Rollout:
    return Rollout(**{**row, "spec": json.loads(row["spec"])})


class Rollouts:
    """The ``rollouts`` and ``rollout_devices`` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, spec: dict[str, Any], waves: list[list[PlannedDevice]], phase: str = "") -> int:
        now = time.time()
        row = {"spec": json.dumps(spec), "state": "running", "wave": 0, "reason": "", "created": now, "updated": now}
        rid = self.db.insert("rollouts", {**row, "wave_started": now, "wave_done": 0, "phase": phase})
        rows = [
            {"rollout": rid, "device": m.device, "wave": wave, "state": "pending", **asdict(m), "assigned_at": 0, "reason": ""}
            for wave, members in enumerate(waves)
            for m in members
        ]
        if rows:  # one bulk write: a rollout over 10,000 devices is not 10,000 round trips to a server
            self.db.copy("rollout_devices", list(rows[0]), [list(r.values()) for r in rows])
        return rid

    def get(self, rid: int) -> Rollout | None:
        rows = self.db.query("SELECT * FROM rollouts WHERE id = ?", [rid])
        return _rollout(rows[0]) if rows else None

    def all(self) -> list[Rollout]:
        return [_rollout(row) for row in self.db.query("SELECT * FROM rollouts ORDER BY id")]

    def update(self, rid: int, fields: dict[str, Any], only_if: Sequence[str] = ()) -> bool:
        unknown = set(fields) - set(_ROLLOUT_COLUMNS) | ({"id", "updated"} & set(fields))
        if unknown:
            raise TypeError(f"a rollout has no field to set named {', '.join(sorted(unknown))}")
        sets = ", ".join(f"{name} = :{name}" for name in fields)
        states = {f"only_if_{i}": state for i, state in enumerate(only_if)}
        condition = f" AND state IN ({', '.join(':' + k for k in states)})" if states else ""
        params = {**fields, **states, "updated": time.time(), "id": rid}
        return self.db.execute(f"UPDATE rollouts SET {sets}, updated = :updated WHERE id = :id{condition}", params) > 0

    def devices(self, rid: int, wave: int | None = None) -> list[RolloutDevice]:
        where, args = ("rollout = ?", [rid]) if wave is None else ("rollout = ? AND wave = ?", [rid, wave])
        rows = self.db.query(f"SELECT {_DEVICE_COLUMNS} FROM rollout_devices WHERE {where} ORDER BY device", args)
        return [RolloutDevice(**row) for row in rows]

    def set_states(self, rid: int, changes: Iterable[DeviceChange]) -> None:
        """Each device's change, a later one for the same device winning (its ``assigned_at`` kept from the last change
        that set one); devices changed alike are updated in one statement (a batch of a wave: one UPDATE, not 200)."""
        last: dict[str, DeviceChange] = {}
        for c in changes:
            before = last.get(c.device)
            if before is not None and c.assigned_at is None and before.assigned_at is not None:
                c = DeviceChange(c.device, c.state, c.reason, before.assigned_at)
            last[c.device] = c
        alike: dict[tuple[str, str, float | None], list[str]] = {}
        args: list[object]
        for c in last.values():
            alike.setdefault((c.state, c.reason, c.assigned_at), []).append(c.device)
        for (state, reason, assigned_at), devices in alike.items():
            sets, args = "state = ?, reason = ?", [state, reason]
            if assigned_at is not None:
                sets, args = sets + ", assigned_at = ?", [*args, assigned_at]
            for part in self.db.chunks(devices):
                where, ids = self.db.in_list("device", part)
                self.db.execute(f"UPDATE rollout_devices SET {sets} WHERE rollout = ? AND {where}", [*args, rid, *ids])
