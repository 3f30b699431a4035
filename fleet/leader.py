"""Which of several ``fleet serve`` processes on one store leads: runs the rollout engine and re-signs online metadata.

Why a lock and not an election: the store already is the one thing every controller shares. On PostgreSQL the
leader holds a session-level advisory lock (``pg_try_advisory_lock``) on one connection of its own for as long as
it leads; the server frees it the moment that connection drops, so when the leader dies (even by ``kill -9``) a
standby that retries every second takes over within seconds, and goes on from the rollout state in the store.
On SQLite (one host only: the database is a local file) the same is an exclusive, non-blocking ``flock`` on a file
beside the database (``fleet.db.leader``), which the kernel frees when the process holding it dies.
Two leaders at once would announce twice and re-sign concurrently; neither lock can be held by two processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any

from fleet.store.url import StoreLocation, is_postgres

__all__ = ["LEADER_KEY", "Leadership", "identity", "running_controllers"]

LEADER_KEY = 0x65646765_6C656164  # "edgelead": the advisory lock's key (pg.py's schema lock uses another)


def identity(location: StoreLocation, controller_id: str) -> Leadership:
    """The lock a running controller holds on its own id (PostgreSQL: an advisory lock keyed by the id's hash; SQLite:
    ``fleet.db.controller-ID``): a second process with the same id is refused, and the leader knows a controller whose
    lock is free is dead (``fleet.transport.adopt``)."""
    digest = hashlib.sha256(f"edgefleet-controller:{controller_id}".encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in controller_id)[:100]
    return Leadership(location, key, suffix=f".controller-{safe}")


def running_controllers(location: StoreLocation, ids: list[str], db: Any = None) -> list[str]:
    """Of ``ids``, the controllers whose process runs now: their id lock is held (``identity``).

    PostgreSQL: asked on ``db`` (a ``fleet.store.db.Database`` in a transaction, the caller's own) with
    ``pg_try_advisory_xact_lock``, so no connection is opened (a probe that could not connect would have counted
    as a running controller) and what it took goes at the transaction's end. SQLite: each id's lock file is tried
    and let go at once."""
    if is_postgres(location):
        if db is None:
            raise ValueError("running_controllers on PostgreSQL asks through a database in a transaction")
        taken = [db.query("SELECT pg_try_advisory_xact_lock(?) AS free", [identity(location, cid).key])[0]["free"] for cid in ids]
        return [cid for cid, free in zip(ids, taken, strict=True) if not free]
    alive = []
    for controller_id in ids:
        probe = identity(location, controller_id)
        try:
            if probe.holder_alive():
                alive.append(controller_id)
        finally:
            probe.release()
    return alive


class Leadership:
    """One controller's claim to lead on ``location`` (a SQLite path or a ``postgresql://`` URL). No I/O until
    ``try_acquire``; ``release`` (or the process ending) lets another take it."""

    def __init__(self, location: StoreLocation, key: int = LEADER_KEY, suffix: str = ".leader") -> None:
        self.location, self.key, self.suffix = location, key, suffix
        self._conn: Any = None  # psycopg.Connection holding the advisory lock (PostgreSQL)
        self._fd: int | None = None  # the locked file (SQLite)
        self._locked = False  # the advisory lock was granted on self._conn (a standby keeps its connection for retries)

    def try_acquire(self) -> bool:
        """Lead now if nobody does (never waits); True while this instance holds the lock."""
        if self.held():
            return True
        return self._acquire_pg() if is_postgres(self.location) else self._acquire_file()

    def held(self) -> bool:
        """This instance leads. On PostgreSQL the lock's connection is checked: a server restart or a network cut ends
        the session and with it the lock, and a leader that goes on leading after that would be one of two."""
        if self._fd is not None:
            return True
        if self._conn is None or not self._locked:
            return False
        try:  # the lock lives as long as its session: a live session still holds it (only release() unlocks)
            self._conn.execute("SELECT 1")
        except Exception:  # psycopg.OperationalError and kin: the session is gone, and so is the lock
            self._close_conn()
            return False
        return True

    def release(self) -> None:
        """Stop leading (idempotent): the lock's connection closes, or the file is unlocked."""
        if self._conn is not None and self._locked:
            try:  # unlocked now: a closed connection's session (and lock) ends only when the server gets to it
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            except Exception:  # a broken connection: closing it below ends the session all the same
                pass
        self._close_conn()
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _acquire_pg(self) -> bool:
        import psycopg

        try:
            if self._conn is None:
                self._conn = psycopg.connect(str(self.location), autocommit=True, connect_timeout=5, application_name="edgefleet-leader")
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        except psycopg.Error:
            self._close_conn()
            return False
        self._locked = bool(row and row[0])
        return self._locked

    def _acquire_file(self) -> bool:
        path = Path(str(self.location) + self.suffix)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def holder_alive(self) -> bool:
        """Whether some process holds the lock now (this instance must not): taken and given back at once if free. A
        store that does not answer counts as held: nothing is taken over on a guess."""
        if is_postgres(self.location):
            import psycopg

            try:
                if self._conn is None:
                    self._conn = psycopg.connect(str(self.location), autocommit=True, connect_timeout=5, application_name="edgefleet-probe")
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
                if row and row[0]:
                    self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
                    return False
                return True
            except psycopg.Error:
                self._close_conn()
                return True
        return self._file_held()

    def _file_held(self) -> bool:
        """Whether another process holds the lock file: tried read-only and let go at once. A file never made was
        never locked (nothing is created for a probe); one this user cannot open counts as held (no guessing)."""
        try:
            fd = os.open(str(self.location) + self.suffix, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing the descriptor lets go of a lock it took
        return False

    def _close_conn(self) -> None:
        self._locked = False
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # closing a broken connection may raise; it is closed either way
                pass
            self._conn = None
