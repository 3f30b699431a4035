"""The store's tables as data, the schema's versions, and the runner that brings any store up to the latest.

Why data: the columns are read in one place (here) by whoever needs them — each dialect's DDL (``sql`` for
SQLite, ``pg`` for PostgreSQL), the PostgreSQL bulk writer's column types — instead of living inside the code that
writes them. Why versions: a store records in ``schema_version`` which of ``VERSIONS`` it has; ``upgrade`` runs the
missing ones in order, each in the dialect's words (``Database.migrate``), all in one transaction under a lock, so a
store written by any earlier release opens, and two controllers opening it at once migrate it once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import EdgefleetError
from fleet.store.db import Database

__all__ = [
    "ADDED_COLUMNS",
    "ADDED_TABLES",
    "DAY_S",
    "INDEXES",
    "LATEST",
    "PARTITIONED",
    "REPORT_ORDER",
    "VERSIONS",
    "added_later",
    "AddedColumns",
    "StoreInUse",
    "StoreTooNew",
    "Table",
    "upgrade",
    "version",
]


class StoreTooNew(EdgefleetError):
    """The store was migrated by a newer edgefleet: this one would misread it."""

    code = "store_too_new"


class StoreInUse(EdgefleetError):
    """Controllers of an earlier release still run on a store this release would upgrade: after the upgrade they
    would go on writing it the old way (since version 5, batches without their totals). Nothing was changed."""

    code = "store_in_use"


@dataclass(frozen=True)
class Table:
    name: str
    columns: dict[str, type]
    pk: str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class AddedColumns:
    """Columns added to ``table`` after SQLite stores were written without them (before versions); ``then`` runs once,
    when they are added."""

    table: str
    columns: dict[str, type]
    why: str
    default: Any = None  # not_null_default of the added columns (None: nullable)
    then: str = ""  # SQL run after adding them, with ``:now`` bound


TABLES = (
    Table(
        "devices",
        {
            "id": str,
            "online": int,
            "session": int,
            "last_seen": float,
            "hardware": str,
            "runtimes": str,  # JSON
            "models": str,  # JSON
            "tags": str,  # JSON
            "update": str,  # JSON
            "preferred_variants": str,  # JSON
            "reported_ts": float,  # version 6: the held report's own time and session, against replays (devices.stale_replay)
            "reported_session": int,
        },
        pk="id",
    ),
    Table(
        "telemetry",
        {
            "device": str,
            "seq": int,
            "ts": float,  # the controller's receive time: a device's clock decides nothing
            "model": str,
            "version": str,
            "requests": int,
            "errors": int,  # server-side only: these count against the version
            "p95_ms": float,
            "client_errors": int,
            "session": int,
            "device_ts": float,
        },
    ),
    Table("batches", {"device": str, "session": int, "seq": int, "ts": float}, pk=("device", "session", "seq")),
    Table(
        "predictions",
        {
            "device": str,
            "ts": float,
            "model": str,
            "version": str,
            "rows": int,
            "n": int,
            "total": float,
            "total_sq": float,
            "classes": str,
        },
    ),
    Table(
        "shadow",
        {
            "device": str,
            "ts": float,
            "model": str,
            "version": str,
            "shadow_version": str,
            "compared": int,
            "agreed": int,
            "abs_diff_sum": float,
            "n": int,
            "mismatched": int,
            "errors": int,
            "skipped": int,
            "p95_ms": float,
            "active_p95_ms": float,
        },
    ),
    Table("jobs", {"device": str, "job": str, "target": str, "state": str, "reason": str, "ts": float}, pk=("device", "job")),
    Table(
        "rollouts",
        {
            "id": int,
            "spec": str,  # JSON: the RolloutSpec
            "state": str,
            "wave": int,
            "reason": str,
            "created": float,
            "updated": float,
            "wave_started": float,
            "wave_done": float,
            "phase": str,
        },
        pk="id",
    ),
    Table(
        "rollout_devices",
        {
            "rollout": int,
            "device": str,
            "wave": int,
            "state": str,
            "previous": str,
            "variant": str,
            "assigned_at": float,
            "reason": str,
            "hardware": str,  # as the device reported it when the rollout started: what the gates group by
        },
        pk=("rollout", "device"),
    ),
    # the director's signed metadata as every controller serves it: one row per file of a device's repository
    # (``N.root.json``, ``N.targets.json``, ``N.snapshot.json``, ``timestamp.json``); device "" holds the director's
    # own roots and mirrors.json. ``version``: the file's metadata version (timestamp.json's own for it)
    Table("director_metadata", {"device": str, "name": str, "version": int, "body": bytes, "updated": float}, pk=("device", "name")),
    # every controller that ever served this fleet, by its stable id: the leader checks which of them died and takes
    # their ingest sessions over (``fleet.transport.adopt``)
    Table("controllers", {"id": str, "client_id": str, "host": str, "started": float}, pk="id"),
    # per model version, every answered call and error the stored telemetry ever counted: the ingest adds each
    # batch's in the transaction that stores it, so ``/metrics``' counters miss no batch, however late it was
    # written; a version's row goes only with its last telemetry row (``Telemetry.prune``)
    Table("model_totals", {"model": str, "version": str, "requests": int, "errors": int, "client_errors": int}, pk=("model", "version")),
)

# Version 5 starts the totals from the telemetry a store holds (what the counters counted before it).
SEED_TOTALS = (
    "INSERT INTO model_totals (model, version, requests, errors, client_errors)"
    " SELECT model, version, coalesce(sum(requests), 0), coalesce(sum(errors), 0), coalesce(sum(client_errors), 0)"
    " FROM telemetry GROUP BY model, version"
)

# Created after the migrations (an index may name a migrated column), in this order.
INDEXES = {
    "batches_ts": ("batches", ("ts",)),
    "telemetry_ts": ("telemetry", ("ts",)),
    "telemetry_model": ("telemetry", ("model", "version", "ts")),
    # the health gate's windows (``windows``): one device's rows on one version in a span of receive time
    "telemetry_window": ("telemetry", ("device", "model", "version", "ts")),
    "predictions_model": ("predictions", ("model", "version", "ts")),
    "predictions_window": ("predictions", ("device", "model", "version", "ts")),
    "shadow_model": ("shadow", ("model", "shadow_version", "ts")),
}

ADDED_COLUMNS = (
    AddedColumns(
        "telemetry",
        {"client_errors": int, "session": int, "device_ts": float},
        why="a store from before the wire contract",
        # its rows carry the devices' clocks: none may stay in the future, past retention (the gates skip them)
        then="UPDATE telemetry SET ts = min(ts, :now)",
    ),
    AddedColumns("rollouts", {"phase": str}, why="a store from before shadow mode", default=""),
    AddedColumns("rollout_devices", {"hardware": str}, why="a store from before per-device gates", default=""),
)

# Version 6: the time and session of the ``reported`` each device's record holds (records from before: 0, older than any).
REPORT_ORDER = AddedColumns("devices", {"reported_ts": float, "reported_session": int}, why="the order of reports", default=0)

# The append-only tables of telemetry: PostgreSQL partitions them by day of ``ts`` (the receive time) and retention
# drops whole days; SQLite keeps one table each and deletes old rows.
PARTITIONED = ("telemetry", "predictions", "shadow")
DAY_S = 86400

# (version, what it brings), in order; each dialect says how (``sql.MIGRATIONS``, ``pg.MIGRATIONS``).
VERSIONS = (
    (1, "the tables, their indexes, and on SQLite the columns added before versions existed"),
    (2, "telemetry, predictions and shadow partitioned by day of their receive time (PostgreSQL)"),
    (3, "the director's metadata and the controllers, so that several controllers serve one fleet"),
    (4, "telemetry and predictions indexed by device, model, version and receive time: the health gate's windows"),
    (5, "each model version's totals of answered calls and errors, kept by the ingest (the /metrics counters)"),
    (6, "each device's held report's time and session: a replayed older report no longer writes over a newer one"),
)
# Indexes a version replaced (dropped where present). Why version 4: with (device, model, ts) PostgreSQL planned
# the gate's window query on (model, version, ts) while a day's partition had no statistics yet, scanning every
# device's rows for each window: minutes at 10,000 devices; with every condition in one index, 0.3 s.
DROPPED_INDEXES = {4: ("telemetry_device", "predictions_device")}
ADDED_TABLES = {3: ("director_metadata", "controllers"), 5: ("model_totals",)}  # the tables a version brings (made only where missing)
LATEST = VERSIONS[-1][0]


def added_later(table: str) -> bool:
    """``table`` came with a version after the first (its migration makes it)."""
    return any(table in names for names in ADDED_TABLES.values())


def version(db: Database) -> int:
    """The store's schema version; 0: none recorded (new, or a SQLite store from before versions)."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied FLOAT NOT NULL, why TEXT NOT NULL)")
    return int(db.query("SELECT max(version) AS v FROM schema_version")[0]["v"] or 0)


def upgrade(db: Database, to: int = LATEST, running: Callable[[list[str]], list[str]] | None = None) -> int:
    """Run the versions the store lacks, up to ``to``, in one transaction; the version it has now.

    ``running``: of the controller ids the store has registered, those whose process runs now (their id lock is
    held: ``fleet.leader.running_controllers``). Before it changes anything, an upgrade refuses while any runs
    (``StoreInUse``): a controller running on a store older than this release is of an earlier release. A store
    already at the latest version is opened without asking, so controllers of one release restart one at a time."""
    with db.transaction():
        db.lock_schema()
        current = version(db)
        if current > LATEST:
            raise StoreTooNew(f"the store is at schema version {current}; this edgefleet knows up to {LATEST}: upgrade edgefleet")
        if running is not None and 3 <= current < to:  # version 3 brought the controllers' registry
            alive = running([str(r["id"]) for r in db.query("SELECT id FROM controllers ORDER BY id")])
            if alive:
                raise StoreInUse(
                    f"controllers {', '.join(alive)} of an earlier release run on this store (schema version {current}):"
                    f" stop every controller, then start this release, which upgrades the store to version {to}"
                )
        for number, why in VERSIONS:
            if current < number <= to:
                db.migrate(number)
                db.execute("INSERT INTO schema_version (version, applied, why) VALUES (?, ?, ?)", [number, time.time(), why])
                current = number
    return current
