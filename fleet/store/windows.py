"""Per-device windows of telemetry, aggregated in SQL: what the health gate judges a device on.

The health gate compares each moved device with itself before and after its move, and with the unmoved devices
over the same windows. It used to read every one of those devices' rows since the first move minus the baseline
and sum them in Python: at 10,000 devices, 600 s of baseline and one batch every 10 s that is 600,000 rows per
judgement, held at once and mostly waited for (a 3,000-device rollout spent 14 s of its 100 s reading rows).
Here the database sums them: the windows go in as one JSON parameter a query (``PART`` windows each), read as a
table by each engine's JSON functions, and out comes one row per window that had any telemetry. Apart from that
table the same SQL runs on SQLite and PostgreSQL.

A window's p95 is the median of its batches' p95s (one slow batch does not make a device slow), computed with
window functions: the batches' p95s numbered in order, nulls last, and the middle one or two averaged. Class
counts are summed in Python from the prediction rows that carry them, in receive order; a row of another width
than the window's first (another output shape) is left out (rows received at the very same instant, which one
device's batches never are, count in the order the database returns them). Nothing here locks: ``FleetStore`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.store.db import Database
from fleet.store.telemetry import add_class_counts

__all__ = ["PART", "Window", "WindowPredictions", "WindowTelemetry", "window_predictions", "window_telemetry"]

PART = 5000  # windows a query, sent as one JSON parameter (about 0.4 MB)


@dataclass(frozen=True)
class Window:
    """One device's rows on one version received in ``[since, until)``."""

    device: str
    version: str
    since: float
    until: float


@dataclass(frozen=True)
class WindowTelemetry:
    batches: int
    requests: int
    server_errors: int
    client_errors: int
    p95_ms: float | None


@dataclass(frozen=True)
class WindowPredictions:
    batches: int
    rows: int
    values: int
    total: float
    total_sq: float
    classes: tuple[int, ...] | None


# The windows as a table ``w(idx, device, version, lo, hi)`` made from one JSON parameter. Why not a VALUES list:
# its five parameters a window were parsed by psycopg on every query (15 ms for 400 windows) and the whole gate
# ran three times slower on PostgreSQL than with one parameter.
_WINDOWS = {
    "postgresql": "WITH w AS (SELECT * FROM jsonb_to_recordset(CAST(? AS jsonb))"
    " AS w(idx integer, device text, version text, lo double precision, hi double precision))",
    "sqlite": "WITH w AS (SELECT json_extract(value, '$.idx') AS idx, json_extract(value, '$.device') AS device,"
    " json_extract(value, '$.version') AS version, json_extract(value, '$.lo') AS lo, json_extract(value, '$.hi') AS hi"
    " FROM json_each(?))",
}


def _with_windows(db: Database, part: Sequence[Window]) -> tuple[str, list[Any]]:
    """The ``WITH w AS (...)`` clause for ``part`` and its one parameter; a window is known by its index in ``part``."""
    rows = [{"idx": i, "device": w.device, "version": w.version, "lo": float(w.since), "hi": float(w.until)} for i, w in enumerate(part)]
    return _WINDOWS[db.dialect], [json.dumps(rows)]


def _parts(db: Database, table: str, model: str, windows: Sequence[Window]) -> Iterator[Sequence[Window]]:
    """``windows`` a query at a time, the planner's statistics of the rows they span made fresh first; windows no
    store can hold rows for (a NUL in a name: PostgreSQL's text cannot carry one, and the wire never lets one in)
    are left out, so they get no sums instead of failing the query."""
    storable = [w for w in windows if "\x00" not in w.device + w.version + model]
    if storable:
        db.fresh_statistics(table, min(w.since for w in storable), max(w.until for w in storable))
    for i in range(0, len(storable), PART):
        yield storable[i : i + PART]


_JOIN = "JOIN {table} r ON r.device = w.device AND r.model = ? AND r.version = w.version AND r.ts >= w.lo AND r.ts < w.hi"

_TELEMETRY = """{with_windows},
x AS (
  SELECT w.idx AS idx, r.requests AS requests, r.errors AS errors, coalesce(r.client_errors, 0) AS client_errors,
         r.p95_ms AS p95_ms,
         row_number() OVER (PARTITION BY w.idx ORDER BY r.p95_ms IS NULL, r.p95_ms) AS rn,
         count(r.p95_ms) OVER (PARTITION BY w.idx) AS timed
  FROM w {join}
)
SELECT idx, count(*) AS batches, sum(requests) AS requests, sum(errors) AS server_errors,
       sum(client_errors) AS client_errors,
       avg(CASE WHEN p95_ms IS NOT NULL AND rn IN ((timed + 1) / 2, (timed + 2) / 2) THEN p95_ms END) AS p95_ms
FROM x GROUP BY idx"""


def telemetry_query(db: Database, model: str, part: Sequence[Window]) -> tuple[str, list[Any]]:
    """The query summing ``part``'s telemetry, and its parameters (apart for a test of its plan)."""
    with_windows, args = _with_windows(db, part)
    return _TELEMETRY.format(with_windows=with_windows, join=_JOIN.format(table="telemetry")), [*args, model]


def window_telemetry(db: Database, model: str, windows: Sequence[Window]) -> dict[Window, WindowTelemetry]:
    """Each window's telemetry of ``model`` summed; windows without any are left out."""
    out: dict[Window, WindowTelemetry] = {}
    for part in _parts(db, "telemetry", model, windows):
        sql, args = telemetry_query(db, model, part)
        for r in db.query(sql, args):
            out[part[int(r["idx"])]] = WindowTelemetry(
                int(r["batches"]),
                int(r["requests"] or 0),
                int(r["server_errors"] or 0),
                int(r["client_errors"] or 0),
                float(r["p95_ms"]) if r["p95_ms"] is not None else None,
            )
    return out


_PREDICTIONS = """{with_windows}
SELECT w.idx AS idx, count(*) AS batches, sum(r.rows) AS rows, sum(r.n) AS n, sum(r.total) AS total,
       sum(r.total_sq) AS total_sq
FROM w {join} GROUP BY w.idx"""

_CLASSES = """{with_windows}
SELECT w.idx AS idx, r.classes AS classes FROM w {join} WHERE r.classes IS NOT NULL ORDER BY w.idx, r.ts"""


def window_predictions(db: Database, model: str, windows: Sequence[Window]) -> dict[Window, WindowPredictions]:
    """Each window's prediction sums of ``model``; windows without any are left out."""
    out: dict[Window, WindowPredictions] = {}
    for part in _parts(db, "predictions", model, windows):
        with_windows, args = _with_windows(db, part)
        join = _JOIN.format(table="predictions")
        classes = _classes(db.query(_CLASSES.format(with_windows=with_windows, join=join), [*args, model]))
        for r in db.query(_PREDICTIONS.format(with_windows=with_windows, join=join), [*args, model]):
            idx = int(r["idx"])
            out[part[idx]] = WindowPredictions(
                int(r["batches"]),
                int(r["rows"] or 0),
                int(r["n"] or 0),
                float(r["total"] or 0.0),
                float(r["total_sq"] or 0.0),
                classes.get(idx),
            )
    return out


def _classes(rows: list[dict[str, Any]]) -> dict[int, tuple[int, ...]]:
    """Per window, its rows' class counts summed in receive order; a row of another width than the first is left out."""
    sums: dict[int, list[int]] = {}
    for r in rows:
        idx = int(r["idx"])
        sums[idx] = add_class_counts(sums.get(idx), json.loads(r["classes"]))
    return {idx: tuple(counts) for idx, counts in sums.items()}
