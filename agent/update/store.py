"""The update tables in the agent's SQLite store: jobs, installed models and refused artifacts.

Why SQLite: every step of the update state machine is one committed transaction, so a ``kill -9`` or a
power cut leaves the last step, never half of one. This module persists what it is given and chooses no
state: ``agent.update.steps`` alone moves a job between states, and hands the store the job to write —
alone, or in one transaction with the installed models it changes (activate, shadow, roll back).

The row layout is the one every agent version wrote (one flat ``jobs`` row per job, its state a bare
string), so an existing device's database loads; a store written by an older agent gains missing columns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import sqlite_utils

from agent.chunks import ChunkManifest
from agent.update.jobs import FINAL, Job, State
from agent.update.verify import VerifiedUpdate

__all__ = ["InstalledModel", "UpdateStore"]


@dataclass
class InstalledModel:
    sha256: str
    model: str
    version: str
    variant: str
    release_counter: int
    target_path: str
    path: str  # the extracted bundle directory
    status: str  # active | kept | rolled_back | shadow
    activated: float = 0.0


# The persisted job row, in the column order a new database is created with.
JOB_COLUMNS: dict[str, type] = {
    "id": str,
    "target_path": str,
    "model": str,
    "version": str,
    "variant": str,
    "release_counter": int,
    "length": int,
    "sha256": str,
    "url": str,
    "chunks": str,  # ChunkManifest.encode(), as verified when the job started
    "state": str,
    "offset": int,
    "reason": str,
    "attempts": int,
    "created": float,
    "updated": float,
    "shadow": int,
}


def job_row(job: Job) -> dict[str, Any]:
    """The job as stored: what it reports, less the derived status, plus where its artifact comes from."""
    row = {k: v for k, v in job.report().items() if k != "status"}
    return {**row, "url": job.update.url, "chunks": job.update.chunks.encode().decode()}


def job_from_row(r: dict[str, Any]) -> Job:
    update = VerifiedUpdate(
        r["target_path"],
        r["model"],
        r["version"],
        r["variant"],
        int(r["release_counter"]),
        int(r["length"]),
        r["sha256"],
        r["url"],
        ChunkManifest.decode(str(r["chunks"]).encode()),
    )
    return Job(
        id=r["id"],
        update=update,
        created=float(r["created"]),
        shadow=bool(r["shadow"]),
        state=State(r["state"]),
        offset=int(r["offset"]),
        reason=r["reason"],
        attempts=int(r["attempts"]),
        updated=float(r["updated"]),
    )


class UpdateStore:
    """The update tables, on a connection (and its lock) shared with the rest of the agent's store."""

    def __init__(self, db: sqlite_utils.Database, lock: threading.RLock) -> None:
        self.db, self._lock = db, lock
        installed = {f.name: _sql_type(f.type) for f in fields(InstalledModel)}
        for table, columns, pk in (("jobs", JOB_COLUMNS, "id"), ("installed", installed, "sha256")):
            self.db.table(table).create(columns, pk=pk, if_not_exists=True)
            have = self.db.table(table).columns_dict
            for name, kind in columns.items():  # a store written by an older agent: add what it lacks
                if name not in have:
                    self.db.table(table).add_column(name, kind, not_null_default=0 if kind in (int, float) else "")
        self.db.table("refused").create({"sha256": str, "target_path": str, "reason": str, "at": float}, pk="sha256", if_not_exists=True)

    # -- jobs ------------------------------------------------------------------

    def save_job(self, job: Job) -> None:
        job.updated = time.time()
        with self._lock:
            self.db.table("jobs").upsert(job_row(job), pk="id")

    def job(self, job_id: str) -> Job | None:
        return next(iter(self._jobs("id = ?", [job_id])), None)

    def jobs(self) -> list[Job]:
        return self._jobs(None, [])

    def jobs_in(self, state: State, sha256: str) -> list[Job]:
        return self._jobs("state = ? AND sha256 = ?", [state.value, sha256])

    def unfinished_job(self) -> Job | None:
        final = sorted(s.value for s in FINAL)
        return next(iter(self._jobs(f"state NOT IN ({', '.join('?' for _ in final)})", final, "created desc", 1)), None)

    def _jobs(self, where: str | None, args: list[Any], order_by: str = "created", limit: int | None = None) -> list[Job]:
        with self._lock:
            rows = list(self.db.table("jobs").rows_where(where, args, order_by=order_by, limit=limit))
        return [job_from_row(r) for r in rows]

    # -- installed models ------------------------------------------------------

    def installed(self, model: str | None = None) -> list[InstalledModel]:
        where, args = ("model = ?", [model]) if model else (None, [])
        with self._lock:
            return [InstalledModel(**r) for r in self.db.table("installed").rows_where(where, args, order_by="activated desc")]

    def active(self) -> dict[str, InstalledModel]:
        return {m.model: m for m in self.installed() if m.status == "active"}

    def shadows(self) -> dict[str, InstalledModel]:
        return {m.model: m for m in self.installed() if m.status == "shadow"}

    def add_shadow(self, job: Job, new: InstalledModel) -> None:
        """One transaction: ``new`` is the model's shadow (replacing the one before), ``job`` saved."""
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM installed WHERE model = ? AND status = 'shadow'", [new.model])
            new.status, new.activated = "shadow", time.time()
            self._replace("installed", asdict(new))
            self._write_jobs([job])

    def activate(self, job: Job, new: InstalledModel) -> None:
        """One transaction: the new model active, the old one kept, ``job`` saved."""
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE installed SET status = 'kept' WHERE model = ? AND status = 'active'", [new.model])
            new.status, new.activated = "active", time.time()
            self._replace("installed", asdict(new))
            self._write_jobs([job])

    def roll_back(self, current: InstalledModel, previous: InstalledModel, reason: str, jobs: Iterable[Job]) -> None:
        """One transaction: ``previous`` active again, ``current`` refused until the director names something else,
        ``jobs`` (those that installed ``current``) saved."""
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE installed SET status = 'rolled_back' WHERE sha256 = ?", [current.sha256])
            self.db.execute("UPDATE installed SET status = 'active', activated = ? WHERE sha256 = ?", [time.time(), previous.sha256])
            self._replace("refused", {"sha256": current.sha256, "target_path": current.target_path, "reason": reason, "at": time.time()})
            self._write_jobs(jobs)

    def _write_jobs(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            job.updated = time.time()
            self._replace("jobs", job_row(job))

    def _replace(self, table: str, row: dict[str, Any]) -> None:
        """Raw SQL inside our own transactions: sqlite-utils' writers commit on their own."""
        cols = ", ".join(row)
        self.db.execute(f"INSERT OR REPLACE INTO {table} ({cols}) VALUES ({', '.join('?' for _ in row)})", list(row.values()))

    def forget(self, sha256: str) -> None:
        with self._lock:
            self.db.table("installed").delete_where("sha256 = ?", [sha256])

    # -- refusals --------------------------------------------------------------

    def refuse(self, sha256: str, target_path: str, reason: str) -> None:
        with self._lock:
            self.db.table("refused").upsert(
                {"sha256": sha256, "target_path": target_path, "reason": reason, "at": time.time()}, pk="sha256"
            )

    def refused(self, sha256: str) -> str | None:
        with self._lock:
            rows = list(self.db.table("refused").rows_where("sha256 = ?", [sha256]))
        return str(rows[0]["reason"]) if rows else None


def _sql_type(t: Any) -> type:
    return {"int": int, "float": float}.get(str(t), str)
