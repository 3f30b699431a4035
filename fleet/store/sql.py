"""The SQLite dialect of the store, in one place: the connection, transactions, inserts with a conflict rule, IN lists,
the schema's DDL and its migrations.

Why a module of its own: the other store modules speak in records (dicts in, dicts out, named columns) and plain
SELECTs; whatever only SQLite says (pragmas, ``BEGIN IMMEDIATE``, ``INSERT OR IGNORE``, the bound-variable limit,
``ALTER TABLE ADD COLUMN`` for stores written before a column existed) lives here. ``pg`` is the same for
PostgreSQL; both implement ``db.Database``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

from fleet.store import schema
from fleet.store.db import Conflict, Params
from fleet.store.url import StoreUnreachable

__all__ = ["MAX_VARIABLES", "MIGRATIONS", "SQLite", "retry_locked"]

MAX_VARIABLES = 500  # bound variables per statement, well under SQLite's limit
T = TypeVar("T")
_TYPES = {str: "TEXT", int: "INTEGER", float: "FLOAT", bytes: "BLOB"}  # what sqlite-utils wrote for stores made before versions


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


@lru_cache(maxsize=64)
def _insert_sql(table: str, columns: tuple[str, ...], conflict: Conflict) -> str:
    rule = {"": "", "ignore": " OR IGNORE", "replace": " OR REPLACE"}[conflict]
    names = ", ".join(f'"{c}"' for c in columns)
    return f'INSERT{rule} INTO "{table}" ({names}) VALUES ({", ".join(":" + c for c in columns)})'


class SQLite:
    """One SQLite file (WAL), autocommit outside explicit transactions, shared between the controller's threads."""

    dialect: Literal["sqlite"] = "sqlite"
    record_errors: tuple[type[Exception], ...] = (sqlite3.Error, TypeError, ValueError, OverflowError)

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            self.conn.execute("PRAGMA schema_version")  # sqlite3 opens lazily: a path it cannot open fails here
        except (OSError, sqlite3.Error) as exc:  # a path too long, a directory, no permission: said, not a traceback
            raise StoreUnreachable(f"SQLite store {self.name[:200]}: {exc}") from exc
        self.serial = threading.RLock()  # one connection, one thread at a time (re-entered: a call inside a call)
        self.conn.row_factory = sqlite3.Row
        # WAL fails at once with "database is locked" (no busy wait) while another process creates the file: retried
        retry_locked(lambda: self.conn.execute("PRAGMA journal_mode=WAL"))
        self.conn.execute("PRAGMA synchronous=NORMAL")  # the controller can re-derive state from the devices' retained messages

    def close(self) -> None:
        self.conn.close()

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in self.conn.execute(sql, params)]

    def execute(self, sql: str, params: Params = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    def insert(self, table: str, record: Mapping[str, Any], conflict: Conflict = "") -> int:
        """(sqlite-utils' ``table.insert`` says the same but checks the table on every call: an order of magnitude
        slower on the ingest's path.)"""
        cursor = self.conn.execute(_insert_sql(table, tuple(record), conflict), dict(record))
        return int(cursor.lastrowid or 1) if cursor.rowcount else 0

    def insert_new(self, table: str, records: Sequence[Mapping[str, Any]]) -> list[bool]:
        return [bool(self.insert(table, r, conflict="ignore")) for r in records]

    def copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            names = ", ".join(f'"{c}"' for c in columns)
            self.conn.executemany(f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" for _ in columns)})', rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction, taken up front (``BEGIN IMMEDIATE``): readers go on, a second writer waits."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            yield

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        self.conn.execute("SAVEPOINT one")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK TO one")
            raise
        finally:
            self.conn.execute("RELEASE one")

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        if not values:
            return "0", []
        return f"{column} IN ({', '.join('?' for _ in values)})", list(values)

    def chunks(self, values: Sequence[T]) -> Iterator[Sequence[T]]:
        for i in range(0, len(values), MAX_VARIABLES):
            yield values[i : i + MAX_VARIABLES]

    def bucket(self, column: str, width_param: str) -> str:
        return f"CAST({column} / :{width_param} AS INTEGER)"

    # -- time partitions: SQLite keeps one table per kind and prunes it by DELETE -----------------------------------

    def ensure_partitions(self, times: Sequence[float]) -> None:
        """Nothing to make: one table holds every day."""

    def fresh_statistics(self, table: str, since: float, until: float) -> None:
        """Nothing to do: SQLite's planner picks the index that holds the most of a query's conditions by itself."""

    def remove_before(self, table: str, cutoff: float) -> int:
        return self.execute(f'DELETE FROM "{table}" WHERE ts < ?', [cutoff])

    # -- the schema ----------------------------------------------------------------------------------------------

    def lock_schema(self) -> None:
        """Nothing more to take: ``BEGIN IMMEDIATE`` already keeps a second writer out while the schema changes."""

    def migrate(self, version: int) -> None:
        MIGRATIONS[version](self)

    def columns(self, table: str) -> set[str]:
        return {row["name"] for row in self.query(f'PRAGMA table_info("{table}")')}


def _create_table(db: SQLite, table: schema.Table) -> None:
    """As sqlite-utils wrote it (an integer ``id`` key is the rowid), so stores from before versions look the same."""
    columns = []
    for name, kind in table.columns.items():
        key = " PRIMARY KEY" if table.pk == name else ""
        columns.append(f'"{name}" {_TYPES[kind]}{key}')
    if isinstance(table.pk, tuple):
        columns.append(f"PRIMARY KEY ({', '.join(table.pk)})")
    db.execute(f'CREATE TABLE IF NOT EXISTS "{table.name}" ({", ".join(columns)})')


def _add_columns(db: SQLite, added: schema.AddedColumns) -> None:
    missing = {name: kind for name, kind in added.columns.items() if name not in db.columns(added.table)}
    if not missing:
        return
    for name, kind in missing.items():
        default = f" NOT NULL DEFAULT {added.default!r}" if added.default is not None else ""
        db.execute(f'ALTER TABLE "{added.table}" ADD COLUMN "{name}" {_TYPES[kind]}{default}')
    if added.then:
        db.execute(added.then, {"now": time.time()})


def _v1(db: SQLite) -> None:
    """The tables, the columns added since the first release (a store from before versions may lack them), the indexes:
    each only where missing, so a store written by any earlier release opens."""
    for table in schema.TABLES:
        if not schema.added_later(table.name):
            _create_table(db, table)
    for added in schema.ADDED_COLUMNS:
        _add_columns(db, added)
    for name, (table_name, columns) in schema.INDEXES.items():
        db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table_name} ({', '.join(columns)})")


def _v2(db: SQLite) -> None:
    """Telemetry by day is PostgreSQL's: here one table per kind stays, pruned by DELETE on its ``ts`` index."""


def _v3(db: SQLite) -> None:
    """The director's metadata and the controllers (``schema.ADDED_TABLES``)."""
    for table in schema.TABLES:
        if table.name in schema.ADDED_TABLES[3]:
            _create_table(db, table)


def _v4(db: SQLite) -> None:
    """The gate's window indexes in place of the indexes they replace (``schema.DROPPED_INDEXES``)."""
    for name in schema.DROPPED_INDEXES[4]:
        db.execute(f"DROP INDEX IF EXISTS {name}")
    for name, (table_name, columns) in schema.INDEXES.items():
        db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table_name} ({', '.join(columns)})")


def _v5(db: SQLite) -> None:
    """Each model version's totals (``schema.ADDED_TABLES``), started from the telemetry the store holds."""
    for table in schema.TABLES:
        if table.name in schema.ADDED_TABLES[5]:
            _create_table(db, table)
    db.execute(schema.SEED_TOTALS)


def _v6(db: SQLite) -> None:
    """Each device's held report's time and session (``schema.REPORT_ORDER``; a store made since has them)."""
    _add_columns(db, schema.REPORT_ORDER)


MIGRATIONS: dict[int, Callable[[SQLite], None]] = {1: _v1, 2: _v2, 3: _v3, 4: _v4, 5: _v5, 6: _v6}
