"""Fleet-wide aggregates for ``/metrics``: a handful of GROUP BY queries, each answered from an index or a small table.

Why apart from ``telemetry`` and ``rollouts``: these are read at every Prometheus scrape (every 15 s or so), for the
whole fleet at once, so each is one query whose result has a row per label set (model version, hardware class,
state) — never per telemetry row. The same SQL runs on SQLite and PostgreSQL. Nothing here locks or opens
transactions: ``FleetStore`` does, around these calls.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field

from fleet.store.db import Database

__all__ = ["FleetAggregates", "VersionTotals", "fleet_aggregates", "telemetry_totals"]

ENDED = ("done", "aborted")


@dataclass(frozen=True)
class VersionTotals:
    """One model version's answered calls, server-side and client-side errors."""

    requests: int = 0
    server_errors: int = 0
    client_errors: int = 0


@dataclass
class FleetAggregates:
    devices: Counter[tuple[bool, str]] = field(default_factory=Counter)  # (online, hardware) -> devices
    p95_ms: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, version) -> median of the devices' p95
    rollouts: Counter[str] = field(default_factory=Counter)  # rollout state -> rollouts
    waves: Counter[str] = field(default_factory=Counter)  # wave state (done, current, aborted, pending, cancelled) -> waves
    rollout_devices: Counter[str] = field(default_factory=Counter)  # device state in rollouts not ended -> devices
    gates: Counter[tuple[str, str]] = field(default_factory=Counter)  # (gate, decision) -> decisions


def telemetry_totals(db: Database) -> dict[tuple[str, str], VersionTotals]:
    """Per model version, what all stored telemetry counted (``model_totals``: one row each, kept by the ingest)."""
    rows = db.query("SELECT model, version, requests, errors, client_errors FROM model_totals")
    return {
        (r["model"], r["version"]): VersionTotals(int(r["requests"] or 0), int(r["errors"] or 0), int(r["client_errors"] or 0))
        for r in rows
    }


def fleet_aggregates(db: Database, p95_since: float) -> FleetAggregates:
    out = FleetAggregates()
    for r in db.query("SELECT online, hardware, count(*) AS n FROM devices GROUP BY online, hardware"):
        out.devices[(bool(r["online"]), r["hardware"] or "")] += int(r["n"])
    _p95(db, p95_since, out)
    _rollouts(db, out)
    return out


def _p95(db: Database, since: float, out: FleetAggregates) -> None:
    """Each device's mean batch p95 since ``since``, then the median over devices (as the dashboard's charts: a median
    over devices, so one slow device does not move it, and a fleet slower everywhere does)."""
    per_version: dict[tuple[str, str], list[float]] = {}
    rows = db.query(
        "SELECT model, version, device, avg(p95_ms) AS p95 FROM telemetry WHERE ts >= :since AND p95_ms IS NOT NULL"
        " GROUP BY model, version, device",
        {"since": since},
    )
    for r in rows:
        per_version.setdefault((r["model"], r["version"]), []).append(float(r["p95"]))
    out.p95_ms = {k: statistics.median(v) for k, v in per_version.items()}


def _rollouts(db: Database, out: FleetAggregates) -> None:
    """Rollouts by state; their waves by state; the devices of rollouts not ended by state; gate decisions (a wave
    past its gate is a health gate "go", a rollout past its shadow phase a shadow gate "go", an abort the gate its
    reason names)."""
    rows = db.query(
        "SELECT r.id, r.state, r.wave, r.phase, r.reason, r.spec, max(d.wave) AS last_wave"
        " FROM rollouts r LEFT JOIN rollout_devices d ON d.rollout = r.id GROUP BY r.id, r.state, r.wave, r.phase, r.reason, r.spec"
    )
    for r in rows:
        state, wave, waves = r["state"], int(r["wave"] or 0), int(r["last_wave"] if r["last_wave"] is not None else -1) + 1
        out.rollouts[state] += 1
        for i in range(waves):
            out.waves[_wave_state(state, wave, i)] += 1
        passed = waves if state == "done" else min(wave, waves)
        out.gates[("health", "go")] += passed
        shadow = bool(json.loads(r["spec"] or "{}").get("shadow"))
        aborted_by = _gate_of(r["reason"] or "") if state in ("aborted", "aborting") else ""
        if shadow and not r["phase"]:  # the phase ends only through its gate (an abort leaves it "shadow")
            out.gates[("shadow", "go")] += 1
        if aborted_by:
            out.gates[(aborted_by, "abort")] += 1
    for r in db.query(
        "SELECT d.state, count(*) AS n FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout"
        " WHERE r.state NOT IN ('done', 'aborted') GROUP BY d.state"
    ):
        out.rollout_devices[r["state"]] += int(r["n"])


def _wave_state(rollout: str, current: int, i: int) -> str:
    if i < current or rollout == "done":
        return "done"
    if i == current:
        return "aborted" if rollout in ("aborted", "aborting") else "current"
    return "cancelled" if rollout in ("aborted", "aborting") else "pending"


def _gate_of(reason: str) -> str:
    """The gate an abort's reason names (``install gate: ...``), or ``operator`` for anything else."""
    head = reason.split(":", 1)[0].strip()
    return head.removesuffix(" gate") if head in ("install gate", "health gate", "shadow gate") else "operator"
