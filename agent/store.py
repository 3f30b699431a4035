"""The agent's persistent state: update jobs and installed models, in SQLite (WAL) through sqlite-utils.

Why SQLite: every step of the update state machine is one committed transaction,
so a ``kill -9`` or a power cut leaves the last step, never half of one. Only
``agent.update.machine.Installer`` writes job states; everything else reads.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import sqlite_utils

__all__ = ["AgentStore", "InstalledModel", "Job", "State"]


class State:
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
    FINAL = frozenset({ACTIVE, FAILED, REJECTED, ROLLED_BACK, SHADOW})


@dataclass
class Job:
    id: str
    target_path: str
    model: str
    version: str
    variant: str
    release_counter: int
    length: int
    sha256: str
    url: str
    chunks: str  # ChunkManifest.encode(), as verified when the job started
    state: str = State.IDLE
    offset: int = 0
    reason: str = ""
    attempts: int = 0  # times this job was resumed in HEALTH_CHECK: a model that kills the agent must not loop
    created: float = 0.0
    updated: float = 0.0
    shadow: int = 0  # 1: install to run beside the active version on live inputs (shadow mode), not to serve

    def report(self) -> dict[str, Any]:
        """The job as published on ``dev/{id}/jobs/{job}``."""
        out = {k: v for k, v in asdict(self).items() if k not in ("chunks", "url")}
        out["status"] = _STATUS.get(self.state, "IN_PROGRESS")
        return out


_STATUS = {
    State.ACTIVE: "SUCCEEDED",
    State.SHADOW: "SUCCEEDED",
    State.FAILED: "FAILED",
    State.REJECTED: "REJECTED",
    State.ROLLED_BACK: "ROLLED_BACK",
}


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


class AgentStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the agent's threads, behind a lock; autocommit, transactions made explicit.
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        for table, cls, pk in (("jobs", Job, "id"), ("installed", InstalledModel, "sha256")):
            columns = {f.name: _sql_type(f.type) for f in fields(cls)}
            self.db.table(table).create(columns, pk=pk, if_not_exists=True)
            have = self.db.table(table).columns_dict
            for name, kind in columns.items():  # a store written by an older agent: add what it lacks
                if name not in have:
                    self.db.table(table).add_column(name, kind, not_null_default=0 if kind in (int, float) else "")
        self.db.table("refused").create({"sha256": str, "target_path": str, "reason": str, "at": float}, pk="sha256", if_not_exists=True)
        self.db.table("meta").create({"key": str, "value": int}, pk="key", if_not_exists=True)
        self.db.table("outbox").create({"seq": int, "payload": str, "created": float}, pk="seq", if_not_exists=True)

    def next_session(self) -> int:
        """Counts agent starts; ``status`` carries it so a stale ``lost`` will is told from a live session.

        A fresh store starts counting at the current Unix time, so a device whose state was wiped still starts
        a session above its old ones: the controller keys telemetry batches by (device, session, seq) and would
        otherwise take the new batches for old ones sent again.
        """
        return self._bump("session", start=int(time.time()))

    def _bump(self, key: str, by: int = 1, start: int = 0) -> int:
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", [key, start])
            self.db.execute("UPDATE meta SET value = value + ? WHERE key = ?", [by, key])
            return int(self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()[0])

    # -- telemetry outbox (store-and-forward) --------------------------------------------

    def outbox_add(self, make: Any, max_batches: int, max_age_s: float) -> tuple[int, int]:
        """Append ``make(seq, dropped_so_far)`` under the next sequence number; drop the oldest beyond the limits.

        Returns (seq, batches dropped now). One transaction, so a crash never leaves a gap or a reused number.
        """
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            for key in ("telemetry_seq", "telemetry_dropped"):
                self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, 0)", [key])
            self.db.execute("UPDATE meta SET value = value + 1 WHERE key = 'telemetry_seq'")
            seq = int(self.db.execute("SELECT value FROM meta WHERE key = 'telemetry_seq'").fetchone()[0])
            dropped_total = int(self.db.execute("SELECT value FROM meta WHERE key = 'telemetry_dropped'").fetchone()[0])
            now = time.time()
            self._replace("outbox", {"seq": seq, "payload": make(seq, dropped_total), "created": now})
            old = self.db.execute("DELETE FROM outbox WHERE created < ? OR seq <= ? - ?", [now - max_age_s, seq, max_batches]).rowcount
            if old:
                self.db.execute("UPDATE meta SET value = value + ? WHERE key = 'telemetry_dropped'", [old])
            return seq, int(old)

    def outbox_oldest(self, limit: int = 100) -> list[tuple[int, str]]:
        with self._lock:
            return [(int(r[0]), str(r[1])) for r in self.db.execute("SELECT seq, payload FROM outbox ORDER BY seq LIMIT ?", [limit])]

    def outbox_sent(self, seq: int) -> None:
        with self._lock:
            self.db.execute("DELETE FROM outbox WHERE seq = ?", [seq])

    def outbox_size(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        self.db.close()

    # -- jobs ------------------------------------------------------------------

    def save_job(self, job: Job) -> None:
        job.updated = time.time()
        with self._lock:
            self.db.table("jobs").upsert(asdict(job), pk="id")

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            rows = list(self.db.table("jobs").rows_where("id = ?", [job_id]))
        return Job(**rows[0]) if rows else None

    def jobs(self) -> list[Job]:
        with self._lock:
            return [Job(**r) for r in self.db.table("jobs").rows_where(order_by="created")]

    def unfinished_job(self) -> Job | None:
        with self._lock:
            rows = list(
                self.db.table("jobs").rows_where(
                    f"state NOT IN ({', '.join('?' for _ in State.FINAL)})", sorted(State.FINAL), order_by="created desc", limit=1
                )
            )
        return Job(**rows[0]) if rows else None

    # -- installed models ------------------------------------------------------

    def installed(self, model: str | None = None) -> list[InstalledModel]:
        where, args = ("model = ?", [model]) if model else (None, [])
        with self._lock:
            return [InstalledModel(**r) for r in self.db.table("installed").rows_where(where, args, order_by="activated desc")]

    def active(self) -> dict[str, InstalledModel]:
        return {m.model: m for m in self.installed() if m.status == "active"}

    def shadows(self) -> dict[str, InstalledModel]:
        return {m.model: m for m in self.installed() if m.status == "shadow"}

    def add_shadow(self, job: Job, new: InstalledModel) -> InstalledModel | None:
        """One transaction: ``new`` is the model's shadow (replacing the one before, returned), the job SHADOW."""
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            rows = list(self.db.table("installed").rows_where("model = ? AND status = 'shadow'", [new.model]))
            before = InstalledModel(**rows[0]) if rows else None
            self.db.execute("DELETE FROM installed WHERE model = ? AND status = 'shadow'", [new.model])
            new.status, new.activated = "shadow", time.time()
            self._replace("installed", asdict(new))
            job.state, job.updated = State.SHADOW, time.time()
            self._replace("jobs", asdict(job))
        return before if before is not None and before.sha256 != new.sha256 else None

    def activate(self, job: Job | None, new: InstalledModel) -> None:
        """One transaction: the new model active, the old one kept, the job ACTIVE."""
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE installed SET status = 'kept' WHERE model = ? AND status = 'active'", [new.model])
            new.status, new.activated = "active", time.time()
            self._replace("installed", asdict(new))
            if job is not None:
                job.state, job.updated = State.ACTIVE, time.time()
                self._replace("jobs", asdict(job))

    def roll_back(self, current: InstalledModel, previous: InstalledModel, reason: str) -> None:
        """One transaction: ``previous`` active again, ``current`` refused until the director names something else."""
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE installed SET status = 'rolled_back' WHERE sha256 = ?", [current.sha256])
            self.db.execute("UPDATE installed SET status = 'active', activated = ? WHERE sha256 = ?", [time.time(), previous.sha256])
            self._replace("refused", {"sha256": current.sha256, "target_path": current.target_path, "reason": reason, "at": time.time()})
            self.db.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated = ? WHERE sha256 = ? AND state = ?",
                [State.ROLLED_BACK, reason, time.time(), current.sha256, State.ACTIVE],
            )

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
