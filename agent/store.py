"""The agent's persistent state in one SQLite file (WAL) through sqlite-utils: the session counter and the
telemetry outbox here, the update tables (jobs, installed models, refusals) in ``agent.update.store``.

One connection behind one lock, shared by the agent's threads, so each multi-table change is one transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.update.store import UpdateStore

__all__ = ["AgentStore"]


class AgentStore(UpdateStore):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the agent's threads, behind a lock; autocommit, transactions made explicit.
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        db = sqlite_utils.Database(conn)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        super().__init__(db, threading.RLock())
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
