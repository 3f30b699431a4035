"""What a store's database must do, whichever engine holds it: the one interface both dialects implement.

Why a protocol: the table modules (``devices``, ``telemetry``, ``rollouts``) and the schema's migrations speak
in records and plain SELECTs written once (``?`` and ``:name`` parameters); the dialect modules (``sql`` for
SQLite, ``pg`` for PostgreSQL) turn them into what their engine says, and own the connection, transactions,
bulk writes (``copy``: COPY on PostgreSQL) and time partitions. ``FleetStore`` picks one by the store's name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

__all__ = ["Conflict", "Database", "Params"]

Params = Sequence[Any] | Mapping[str, Any]
Conflict = Literal["", "ignore", "replace"]


class Database(Protocol):
    @property
    def dialect(self) -> Literal["sqlite", "postgresql"]: ...

    @property
    def name(self) -> str:
        """The store as messages may show it (a URL without its password)."""
        ...

    @property
    def serial(self) -> AbstractContextManager[Any]:
        """Held around each of the store's calls. SQLite's one connection serves one thread at a time (its transaction
        is the connection's, not the thread's); PostgreSQL's pool gives each thread a connection and a transaction of
        its own, so its calls run side by side (a repository read never waits behind an ingest flush or a gate query)."""
        ...

    # what one bad record raises (the driver's data errors): the ingest skips and counts that record; anything
    # else (the server gone, a lock held too long) fails the whole batch, which the ingest keeps and retries
    record_errors: tuple[type[Exception], ...]

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]: ...

    def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; how many rows it changed."""
        ...

    def insert(self, table: str, record: Mapping[str, Any], conflict: Conflict = "") -> int:
        """One record by column name; ``conflict`` on its key: "ignore" keeps the stored row, "replace" overwrites it.
        The new row's id (tables with an integer ``id``), else 1; 0 when "ignore" kept the stored row."""
        ...

    def insert_new(self, table: str, records: Sequence[Mapping[str, Any]]) -> list[bool]:
        """Many records (same columns), each only when its key is not stored yet; which ones were new, in order."""
        ...

    def copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Append many rows at once (PostgreSQL: COPY; SQLite: one prepared INSERT)."""
        ...

    def transaction(self) -> AbstractContextManager[None]: ...

    def savepoint(self) -> AbstractContextManager[None]:
        """Inside a transaction: undo only this block's writes when it raises."""
        ...

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """``column IN (?, ...)`` and its arguments; no values: a condition no row meets."""
        ...

    def chunks(self, values: Sequence[Any]) -> Iterator[Sequence[Any]]:
        """``values`` in pieces small enough to bind in one statement."""
        ...

    def bucket(self, column: str, width_param: str) -> str:
        """The whole number of ``:width_param`` widths in ``column``: a time bucket (truncating)."""
        ...

    def ensure_partitions(self, times: Sequence[float]) -> None:
        """The time partitions rows received at ``times`` go into, and the next day's, made where missing."""
        ...

    def fresh_statistics(self, table: str, since: float, until: float) -> None:
        """The query planner's statistics of ``table``'s rows received in ``[since, until)`` up to date (PostgreSQL:
        the day partitions holding them analyzed when never analyzed or changed by a tenth since; SQLite: nothing)."""
        ...

    def remove_before(self, table: str, cutoff: float) -> int:
        """Rows of ``table`` received before ``cutoff`` go (PostgreSQL: whole days' partitions dropped); how many."""
        ...

    def lock_schema(self) -> None:
        """Inside a transaction: keep every other process out of the schema until it ends."""
        ...

    def migrate(self, version: int) -> None:
        """The schema changes of ``version`` (``schema.VERSIONS``), in this engine's words."""
        ...

    def close(self) -> None: ...
