"""The PostgreSQL dialect of the store: a psycopg 3 connection pool, COPY for telemetry, day partitions, migrations.

Why a module of its own: ``sql`` is SQLite's; this says the same things (``db.Database``) in PostgreSQL's words, so
the table modules' queries, written once with ``?`` and ``:name`` parameters, run unchanged (``translate``). What
only a server engine does lives here: a pool several threads share (a transaction holds one connection for its
thread), telemetry appended by COPY (about 100k rows/s here, against 40k by executemany) into tables partitioned
by day of the receive time, made ahead on demand, and retention that drops a whole day's partition instead of
deleting its rows. A transaction-scoped advisory lock keeps two controllers from migrating or partitioning at once.
Imported only when a store URL names PostgreSQL: psycopg is an extra (``edgefleet[postgres]``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Literal, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from agent import logs
from fleet.store import schema
from fleet.store.db import Conflict, Params
from fleet.store.url import StoreUnreachable, redacted

__all__ = ["MIGRATIONS", "PostgreSQL", "translate"]

T = TypeVar("T")
MAX_VARIABLES = 10_000  # bound variables per statement (the protocol allows 65,535)
_TYPES = {str: "TEXT", int: "BIGINT", float: "DOUBLE PRECISION", bytes: "BYTEA"}
_TABLES = {t.name: t for t in schema.TABLES}
_SCHEMA_LOCK = 0x65646765_666C6574  # "edgeflet": pg_advisory_xact_lock's key for schema changes and new partitions
_NAMED = re.compile(r"(?<!:):([A-Za-z_]\w*)")
# DDL that can wait (tomorrow's partition made ahead, an old day dropped) waits this long for the parent table's lock,
# then gives up until DDL_RETRY_S later. Why: CREATE ... PARTITION OF and DROP take an ACCESS EXCLUSIVE lock on the
# parent; one queued behind a long read (a gate's window query, the dashboard's) would hold up every write and read
# of the table queued after it, the whole ingest included, until that read ends.
DDL_LOCK_TIMEOUT_MS = 1000
DDL_RETRY_S = 60.0

log = logging.getLogger("edgefleet.store")


@lru_cache(maxsize=512)
def translate(query: str) -> str:
    """A query written for SQLite's parameters (``?``, ``:name``) in psycopg's (``%s``, ``%(name)s``)."""
    return _NAMED.sub(r"%(\1)s", query.replace("%", "%%")).replace("?", "%s")


def _key(table: str) -> tuple[str, ...]:
    pk = _TABLES[table].pk
    return (pk,) if isinstance(pk, str) else tuple(pk or ())


def _names(columns: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


@lru_cache(maxsize=64)
def _insert_sql(table: str, columns: tuple[str, ...], conflict: Conflict) -> str:
    key = _key(table)
    query = f'INSERT INTO "{table}" ({_names(columns)}) VALUES ({", ".join(f"%({c})s" for c in columns)})'
    rest = [c for c in columns if c not in key]
    if conflict == "ignore" or (conflict == "replace" and not rest):
        query += " ON CONFLICT DO NOTHING"
    elif conflict == "replace":
        query += f" ON CONFLICT ({_names(key)}) DO UPDATE SET " + ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in rest)
    if key == ("id",) and "id" not in columns:
        query += " RETURNING id"
    return query


def _partition(table: str, day: int) -> str:
    return f"{table}_p{datetime.fromtimestamp(day * schema.DAY_S, timezone.utc):%Y%m%d}"


def _day(partition: str) -> int:
    stamp = datetime.strptime(partition.rsplit("_p", 1)[1], "%Y%m%d").replace(tzinfo=timezone.utc)
    return int(stamp.timestamp()) // schema.DAY_S


class PostgreSQL:
    """A store in a PostgreSQL database, through a pool of autocommit connections (transactions are explicit)."""

    dialect: Literal["postgresql"] = "postgresql"
    record_errors: tuple[type[Exception], ...] = (psycopg.DataError, psycopg.IntegrityError, TypeError, ValueError, OverflowError)

    def __init__(self, url: str, pool_size: int = 16, timeout_s: float = 10.0) -> None:
        self.name = redacted(url)
        try:  # one plain connection first: libpq's own words on what is wrong (the pool would only time out)
            psycopg.connect(url, connect_timeout=max(1, int(timeout_s))).close()
        except psycopg.Error as exc:
            raise StoreUnreachable(f"PostgreSQL store {self.name}: {str(exc).strip()}") from exc
        kwargs = {"autocommit": True, "row_factory": dict_row}
        self.pool: ConnectionPool[Any] = ConnectionPool(url, min_size=1, max_size=pool_size, kwargs=kwargs, timeout=timeout_s, open=True)
        self._local = threading.local()  # .conn: the connection of this thread's open transaction
        self._made: set[tuple[str, int]] = set()  # (table, day) partitions known to exist
        self._made_lock = threading.Lock()
        self._ddl_retry_at = 0.0  # monotonic: when DDL that can wait is tried again after it found the table busy
        # calls run side by side, each thread on its own pooled connection: nothing to hold (pool_size: the ingest,
        # four repository readers, the engine, the API and metrics at once, with room; a thread past it waits)
        self.serial = nullcontext()

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self.pool.connection() as pooled:
            yield pooled

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        with self._connection() as conn:
            return list(conn.execute(translate(sql), params).fetchall())

    def execute(self, sql: str, params: Params = ()) -> int:
        with self._connection() as conn:
            return conn.execute(translate(sql), params).rowcount

    def insert(self, table: str, record: Mapping[str, Any], conflict: Conflict = "") -> int:
        query = _insert_sql(table, tuple(record), conflict)
        with self._connection() as conn:
            cursor = conn.execute(query, dict(record))
            if query.endswith("RETURNING id"):
                row = cursor.fetchone()
                return int(row["id"]) if row else 0
            return cursor.rowcount

    def insert_new(self, table: str, records: Sequence[Mapping[str, Any]]) -> list[bool]:
        """One INSERT … SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING RETURNING the keys it took."""
        if not records:
            return []
        columns, key, kinds = tuple(records[0]), _key(table), _TABLES[table].columns
        arrays = ", ".join(f"%s::{_TYPES[kinds[c]]}[]" for c in columns)
        query = f'INSERT INTO "{table}" ({_names(columns)}) SELECT * FROM unnest({arrays}) ON CONFLICT DO NOTHING RETURNING {_names(key)}'
        with self._connection() as conn:
            rows = conn.execute(query, [[r[c] for r in records] for c in columns]).fetchall()
        taken = Counter(tuple(row[k] for k in key) for row in rows)
        new = []
        for r in records:  # the same key twice in one call: the first is new, the second a duplicate
            k = tuple(r[c] for c in key)
            new.append(taken[k] > 0)
            taken[k] -= 1
        return new

    def copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with self._connection() as conn, conn.cursor() as cursor, cursor.copy(f'COPY "{table}" ({_names(columns)}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row(row)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction on one pooled connection, which this thread's statements use until it ends; nested: a savepoint."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            with conn.transaction():
                yield
            return
        with self.pool.connection() as conn, conn.transaction():
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        with self._local.conn.transaction():  # psycopg: a transaction block inside one is a SAVEPOINT
            yield

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """``column = ANY(array)``: one parameter however many values. Why not ``IN (?, ?, ...)``: psycopg splits and
        converts a query's text in Python, about 3 µs a placeholder, and dumps each value alone; a rollout's tick asks
        for 5,000 devices at a time (20 ms a query as an IN list, 5 ms as an array, measured on this machine)."""
        if not values:
            return "FALSE", []
        return f"{column} = ANY(?)", [list(values)]

    def chunks(self, values: Sequence[T]) -> Iterator[Sequence[T]]:
        for i in range(0, len(values), MAX_VARIABLES):
            yield values[i : i + MAX_VARIABLES]

    def bucket(self, column: str, width_param: str) -> str:
        return f"CAST(trunc({column} / :{width_param}) AS BIGINT)"

    # -- time partitions ---------------------------------------------------------------------------------------------

    def ensure_partitions(self, times: Sequence[float]) -> None:
        """The partitions of the rows' days (waited for: the rows go there), then tomorrow's, made ahead so that the
        day's first batch does not wait on DDL (given up while the table is busy: ``DDL_LOCK_TIMEOUT_MS``)."""
        days = {int(t // schema.DAY_S) for t in times}
        if not days:
            return
        needed = sorted((t, d) for d in days for t in schema.PARTITIONED if (t, d) not in self._made)
        if needed:
            self._make_partitions(needed, wait=True)
        ahead = [(t, max(days) + 1) for t in schema.PARTITIONED if (t, max(days) + 1) not in self._made]
        if ahead and time.monotonic() >= self._ddl_retry_at:
            self._make_partitions(ahead, wait=False)

    def _make_partitions(self, missing: list[tuple[str, int]], wait: bool) -> None:
        with self._made_lock:
            try:
                with self.transaction(), self._connection() as conn:
                    if not wait:
                        conn.execute(f"SET LOCAL lock_timeout = {DDL_LOCK_TIMEOUT_MS}")
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", [_SCHEMA_LOCK])  # another controller may be making them
                    for table, day in missing:
                        _create_partition(conn, table, day)
            except psycopg.errors.LockNotAvailable:
                if wait:  # a lock_timeout set on the role or database: the rows need it, the caller must know
                    raise
                self._ddl_busy("create_partition", ",".join(sorted({table for table, _ in missing})))
                return
            self._made.update(missing)

    def _ddl_busy(self, what: str, table: str) -> None:
        self._ddl_retry_at = time.monotonic() + DDL_RETRY_S
        logs.event(log, "store.ddl_deferred", logging.WARNING, what=what, table=table, retry_s=DDL_RETRY_S)

    def fresh_statistics(self, table: str, since: float, until: float) -> None:
        """ANALYZE the day partitions of ``table`` holding ``[since, until)`` that were never analyzed or have changed
        by more than autovacuum's default share since (50 rows + 10 %). Why here and not left to autovacuum: it
        may be off (it was on the machine that found this) or not have reached a new day's partition yet, and
        without statistics the planner chose an index that made the gate's window query scan every device's rows
        for each window (minutes at 10,000 devices; 0.3 s once analyzed)."""
        first, last = int(since // schema.DAY_S), int(until // schema.DAY_S)
        names = [_partition(table, day) for day in range(max(first, last - 7), last + 1)]
        where, args = self.in_list("relname", names)
        stats = self.query(
            f"SELECT relname, n_live_tup, n_mod_since_analyze FROM pg_stat_user_tables WHERE {where}"
            " AND n_mod_since_analyze > 50 + 0.1 * n_live_tup",
            args,
        )
        for row in stats:
            self.execute(f'ANALYZE "{row["relname"]}"')

    def partitions(self, table: str) -> list[str]:
        """The names of ``table``'s partitions, oldest first."""
        rows = self.query(
            "SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = CAST(? AS regclass)",
            [table],
        )
        return sorted(row["name"] for row in rows)

    def remove_before(self, table: str, cutoff: float) -> int:
        """Partitions wholly before ``cutoff`` are dropped (their rows counted first); the day ``cutoff`` falls in is
        deleted from, so retention means the same as on SQLite."""
        removed = 0
        if table in schema.PARTITIONED:
            for name in self.partitions(table):
                day = _day(name)
                if (day + 1) * schema.DAY_S <= cutoff:
                    try:
                        with self.transaction():
                            self.execute(f"SET LOCAL lock_timeout = {DDL_LOCK_TIMEOUT_MS}")
                            n = int(self.query(f'SELECT count(*) AS n FROM "{name}"')[0]["n"])
                            self.execute(f'DROP TABLE "{name}"')
                    except psycopg.errors.LockNotAvailable:  # the table is busy: the next round drops it (not a DELETE)
                        self._ddl_busy("drop_partition", table)
                        return removed
                    removed += n
                    with self._made_lock:
                        self._made.discard((table, day))
        return removed + self.execute(f'DELETE FROM "{table}" WHERE ts < ?', [cutoff])

    # -- the schema ----------------------------------------------------------------------------------------------

    def lock_schema(self) -> None:
        self.execute("SELECT pg_advisory_xact_lock(?)", [_SCHEMA_LOCK])

    def migrate(self, version: int) -> None:
        MIGRATIONS[version](self)


def _create_partition(conn: psycopg.Connection[Any], table: str, day: int) -> None:
    lo, hi = day * schema.DAY_S, (day + 1) * schema.DAY_S
    conn.execute(f'CREATE TABLE IF NOT EXISTS "{_partition(table, day)}" PARTITION OF "{table}" FOR VALUES FROM ({lo}) TO ({hi})')


def _columns_sql(table: schema.Table) -> str:
    columns = []
    for name, kind in table.columns.items():
        if table.pk == name and kind is int:
            columns.append(f'"{name}" BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY')
        else:
            columns.append(f'"{name}" {_TYPES[kind]}' + (" PRIMARY KEY" if table.pk == name else ""))
    if isinstance(table.pk, tuple):
        columns.append(f"PRIMARY KEY ({_names(table.pk)})")
    return ", ".join(columns)


def _indexes(db: PostgreSQL, tables: Sequence[str]) -> None:
    for name, (table, columns) in schema.INDEXES.items():
        if table in tables:
            db.execute(f'CREATE INDEX IF NOT EXISTS {name} ON "{table}" ({_names(columns)})')


def _v1(db: PostgreSQL) -> None:
    """Every table with every column as of version 1, plain (not partitioned), and the indexes."""
    first = [t for t in schema.TABLES if not schema.added_later(t.name)]
    for table in first:
        db.execute(f'CREATE TABLE IF NOT EXISTS "{table.name}" ({_columns_sql(table)})')
    _indexes(db, [t.name for t in first])


def _v2(db: PostgreSQL) -> None:
    """Telemetry, predictions and shadow become partitioned by day of ``ts``: each table is renamed aside, made again
    partitioned, given a partition for every day its rows cover, refilled, and the old one dropped (with its indexes,
    made again on the new table: PostgreSQL puts them on every partition)."""
    for name in schema.PARTITIONED:
        old, table = f"{name}_v1", _TABLES[name]
        db.execute(f'ALTER TABLE "{name}" RENAME TO "{old}"')
        db.execute(f'CREATE TABLE "{name}" ({_columns_sql(table)}) PARTITION BY RANGE (ts)')
        days = db.query(f'SELECT DISTINCT CAST(floor(ts / {schema.DAY_S}) AS BIGINT) AS day FROM "{old}"')
        with db._connection() as conn:
            for row in days:
                _create_partition(conn, name, int(row["day"]))
        columns = _names(list(table.columns))
        db.execute(f'INSERT INTO "{name}" ({columns}) SELECT {columns} FROM "{old}"')
        db.execute(f'DROP TABLE "{old}"')
    _indexes(db, schema.PARTITIONED)


def _v3(db: PostgreSQL) -> None:
    """The director's metadata and the controllers (``schema.ADDED_TABLES``)."""
    for name in schema.ADDED_TABLES[3]:
        db.execute(f'CREATE TABLE IF NOT EXISTS "{name}" ({_columns_sql(_TABLES[name])})')


def _v4(db: PostgreSQL) -> None:
    """The gate's window indexes in place of the indexes they replace (``schema.DROPPED_INDEXES``; dropping a
    partitioned table's index drops its partitions' too, and a new one is made on every partition)."""
    for name in schema.DROPPED_INDEXES[4]:
        db.execute(f"DROP INDEX IF EXISTS {name}")
    _indexes(db, [t.name for t in schema.TABLES])


def _v5(db: PostgreSQL) -> None:
    """Each model version's totals (``schema.ADDED_TABLES``), started from the telemetry the store holds."""
    for name in schema.ADDED_TABLES[5]:
        db.execute(f'CREATE TABLE IF NOT EXISTS "{name}" ({_columns_sql(_TABLES[name])})')
    db.execute(schema.SEED_TOTALS)


def _v6(db: PostgreSQL) -> None:
    """Each device's held report's time and session (``schema.REPORT_ORDER``; a store made since has them)."""
    added = schema.REPORT_ORDER
    for name, kind in added.columns.items():
        db.execute(f'ALTER TABLE "{added.table}" ADD COLUMN IF NOT EXISTS "{name}" {_TYPES[kind]} NOT NULL DEFAULT {added.default!r}')


MIGRATIONS: dict[int, Callable[[PostgreSQL], None]] = {1: _v1, 2: _v2, 3: _v3, 4: _v4, 5: _v5, 6: _v6}
