"""The SQLite dialect of the store, in one place: the connection, transactions, inserts with a conflict rule, IN lists.

Why a module of its own: the other store modules speak in records (dicts in, dicts out, named
columns) and plain SELECTs; whatever only SQLite says (pragmas, ``BEGIN IMMEDIATE``, ``INSERT OR
IGNORE``, the bound-variable limit) lives here, so PostgreSQL behind the same API replaces this
module and the schema's migrations, not the queries of every table.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import sqlite_utils

__all__ = ["MAX_VARIABLES", "bucket", "chunks", "connect", "in_list", "insert", "pragmas", "retry_locked", "savepoint", "transaction"]

MAX_VARIABLES = 500  # bound variables per statement, well under SQLite's limit
T = TypeVar("T")


def connect(path: Path) -> sqlite_utils.Database:
    """The store's database: WAL, autocommit (transactions are explicit), shared between the controller's threads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
    return sqlite_utils.Database(conn)


def pragmas(db: sqlite_utils.Database) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # the controller can re-derive state from the devices' retained messages


def retry_locked(work: Callable[[], T], timeout_s: float = 30.0) -> T:
    """``work()``, again while another process (the CLI beside `fleet serve`) holds the database locked."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return work()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """One write transaction, taken up front (``BEGIN IMMEDIATE``): readers go on, a second writer waits."""
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        yield


@contextmanager
def savepoint(db: sqlite_utils.Database) -> Iterator[None]:
    """Inside a transaction: undo only this block's writes when it raises (one message's trouble is not the batch's)."""
    db.execute("SAVEPOINT one")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK TO one")
        raise
    finally:
        db.execute("RELEASE one")


Conflict = Literal["", "ignore", "replace"]


@lru_cache(maxsize=64)
def _insert_sql(table: str, columns: tuple[str, ...], conflict: Conflict) -> str:
    rule = {"": "", "ignore": " OR IGNORE", "replace": " OR REPLACE"}[conflict]
    names = ", ".join(f'"{c}"' for c in columns)
    return f'INSERT{rule} INTO "{table}" ({names}) VALUES ({", ".join(":" + c for c in columns)})'


def insert(db: sqlite_utils.Database, table: str, record: Mapping[str, Any], conflict: Conflict = "") -> int:
    """Insert one record by column name; ``conflict`` on its key: "ignore" keeps the stored row, "replace" overwrites it.

    Returns the new row's id, or 0 when "ignore" kept the stored row. (sqlite-utils' ``table.insert`` says the
    same but checks the table on every call: an order of magnitude slower on the ingest's path.)"""
    cursor = db.execute(_insert_sql(table, tuple(record), conflict), dict(record))
    return int(cursor.lastrowid or 0) if cursor.rowcount else 0


def in_list(column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
    """``column IN (?, ...)`` and its arguments; no values: a condition no row meets."""
    if not values:
        return "0", []
    return f"{column} IN ({', '.join('?' for _ in values)})", list(values)


def bucket(column: str, width_param: str) -> str:
    """The whole number of ``:width_param`` widths in ``column``: a time bucket (integer division, truncating)."""
    return f"CAST({column} / :{width_param} AS INTEGER)"


def chunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    """``values`` in pieces small enough to bind in one statement."""
    for i in range(0, len(values), MAX_VARIABLES):
        yield values[i : i + MAX_VARIABLES]
