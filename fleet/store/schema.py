"""The store's tables as data, and the migrations that bring an older ``fleet.db`` up to them.

Why data: the columns are read in one place (here) by whoever needs them — creating a
store, migrating an old one, a future PostgreSQL schema — instead of living inside the code
that writes them. A column added later is a ``Migration`` too, so a store written by any
earlier release still opens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from fleet.store import sql

__all__ = ["INDEXES", "MIGRATIONS", "TABLES", "Migration", "Table", "create"]


@dataclass(frozen=True)
class Table:
    name: str
    columns: dict[str, type]
    pk: str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class Migration:
    """Columns added to ``table`` after stores were written without them; ``then`` runs once, when they are added."""

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
)

# Created after the migrations (an index may name a migrated column), in this order.
INDEXES = {
    "batches_ts": ("batches", ("ts",)),
    "telemetry_ts": ("telemetry", ("ts",)),
    "telemetry_model": ("telemetry", ("model", "version", "ts")),
    "telemetry_device": ("telemetry", ("device", "model", "ts")),
    "predictions_model": ("predictions", ("model", "version", "ts")),
    "predictions_device": ("predictions", ("device", "model", "ts")),
    "shadow_model": ("shadow", ("model", "shadow_version", "ts")),
}

MIGRATIONS = (
    Migration(
        "telemetry",
        {"client_errors": int, "session": int, "device_ts": float},
        why="a store from before the wire contract",
        # its rows carry the devices' clocks: none may stay in the future, past retention (the gates skip them)
        then="UPDATE telemetry SET ts = min(ts, :now)",
    ),
    Migration("rollouts", {"phase": str}, why="a store from before shadow mode", default=""),
    Migration("rollout_devices", {"hardware": str}, why="a store from before per-device gates", default=""),
)


def create(db: sqlite_utils.Database) -> None:
    """The tables, the columns added since, the indexes: each only where missing (idempotent; run at every open)."""
    sql.pragmas(db)
    for table in TABLES:
        db.table(table.name).create(table.columns, pk=table.pk, if_not_exists=True)
    for migration in MIGRATIONS:
        migrate(db, migration)
    for name, (table_name, columns) in INDEXES.items():
        db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table_name} ({', '.join(columns)})")


def migrate(db: sqlite_utils.Database, migration: Migration) -> None:
    table = db.table(migration.table)
    missing = {name: kind for name, kind in migration.columns.items() if name not in table.columns_dict}
    if not missing:
        return
    for name, kind in missing.items():
        table.add_column(name, kind, not_null_default=migration.default)
    if migration.then:
        db.execute(migration.then, {"now": time.time()})
