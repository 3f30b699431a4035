"""Telemetry: the devices' batches in (once each), and out as typed rows and aggregates per model version.

Why apart from the registry: this is the store's volume — append-only rows, pruned by age,
read by the gates (per device, ``TelemetryRow``/``PredictionRow``) and by the dashboard and
CLI (summed over devices, ``Health``/``Distribution``/``ShadowHealth``). Every row is stamped
with the controller's receive time: a device's clock decides nothing. Nothing here locks or
opens transactions: ``FleetStore`` does, around these calls.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from agent import wire
from fleet.store.db import Database

__all__ = ["Distribution", "Health", "PredictionRow", "ShadowHealth", "Telemetry", "TelemetryRow"]


@dataclass(frozen=True, slots=True)  # slots: the health gate holds one per device and batch (600,000 at 10,000 devices)
class TelemetryRow:
    """One device's telemetry for one model version in one batch; ``ts`` is when the controller received it."""

    device: str
    ts: float
    version: str
    requests: int
    server_errors: int
    client_errors: int
    p95_ms: float | None


@dataclass(frozen=True, slots=True)
class PredictionRow:
    device: str
    ts: float
    version: str
    rows: int
    values: int
    total: float
    total_sq: float
    classes: list[int] | None


@dataclass(frozen=True)
class Health:
    """One model version over a window: how many answers, how many errors, how slow."""

    requests: int
    errors: int
    p95_ms: float | None  # the median of the devices' reported p95s (robust to one outlier device)
    devices: int

    @property
    def error_rate(self) -> float:
        total = self.requests + self.errors
        return self.errors / total if total else 0.0


@dataclass(frozen=True)
class Distribution:
    """What one model version answered over a window, summed over devices (``agent.serve.predictions``)."""

    rows: int
    values: int
    mean: float | None
    std: float | None
    classes: list[int] | None  # how often each class came out on top, for class-score outputs
    devices: int

    def class_shift(self, before: Distribution) -> float | None:
        """Total variation distance between the two top-class distributions: the share of answers that moved class."""
        if not self.classes or not before.classes or len(self.classes) != len(before.classes):
            return None
        n, m = sum(self.classes), sum(before.classes)
        if not n or not m:
            return None
        return 0.5 * sum(abs(a / n - b / m) for a, b in zip(self.classes, before.classes))

    def mean_shift(self, before: Distribution) -> float | None:
        """How far the mean output moved, in the earlier version's standard deviations."""
        if self.mean is None or before.mean is None or before.std is None:
            return None
        return abs(self.mean - before.mean) / max(before.std, 1e-12)


@dataclass(frozen=True)
class ShadowHealth:
    """A shadow version on some devices over a window: how often it agreed with the version serving there."""

    compared: int
    agreed: int
    mean_abs_diff: float | None
    errors: int
    skipped: int
    mismatched: int
    p95_ms: float | None  # the median of the devices' shadow p95s
    active_p95_ms: float | None  # the same for the version serving, on the same calls
    devices: int

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def share(self) -> float | None:
        """The share of live rows the shadow compared: the agent samples calls out when the shadow is over its CPU
        budget (or behind), so the gate's agreement is over a sample of this size."""
        seen = self.compared + self.skipped
        return self.compared / seen if seen else None


def _median(values: Iterable[float]) -> float | None:
    """The upper median: a value some device reported, never an average of two."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def _window(
    db: Database, model: str, version: str, since: float, devices: Iterable[str] | None, version_column: str = "version"
) -> tuple[str, list[Any]]:
    """The WHERE clause of one model version's rows since ``since``, on ``devices`` when given (none: no rows)."""
    where, args = f"model = ? AND {version_column} = ? AND ts >= ?", [model, version, since]
    if devices is not None:
        chosen, chosen_args = db.in_list("device", list(devices))
        where, args = f"{where} AND {chosen}", args + chosen_args
    return where, args


TELEMETRY_COLUMNS = ("device", "seq", "ts", "model", "version", "requests", "errors", "p95_ms", "client_errors", "session", "device_ts")
PREDICTION_COLUMNS = ("device", "ts", "model", "version", "rows", "n", "total", "total_sq", "classes")
SHADOW_COLUMNS = (
    "device",
    "ts",
    "model",
    "version",
    "shadow_version",
    "compared",
    "agreed",
    "abs_diff_sum",
    "n",
    "mismatched",
    "errors",
    "skipped",
    "p95_ms",
    "active_p95_ms",
)


def _split_errors(w: wire.telemetry.ModelWindow) -> tuple[int, int]:
    """A window's errors: (server-side, against the version; client-side, the callers')."""
    server = wire.telemetry.server_errors(w.errors)
    return server, sum(w.errors.values()) - server


def _telemetry_row(w: wire.telemetry.ModelWindow, device: str, batch: wire.TelemetryBatch, received: float) -> tuple[Any, ...]:
    """One ``telemetry`` row, in ``TELEMETRY_COLUMNS``' order."""
    server, client = _split_errors(w)
    return (device, batch.seq, received, w.model, w.version, w.count, server, w.p95_ms, client, batch.session, batch.ts)


def add_class_counts(held: list[int] | None, counts: list[int]) -> list[int]:
    """``counts`` added to the class counts ``held`` so far (None: the first row, which sets the width); a row of
    another width (a different output shape) is not comparable and is left out."""
    if held is None:
        return list(counts)
    return [a + b for a, b in zip(held, counts)] if len(held) == len(counts) else held


class Telemetry:
    """The ``telemetry``, ``predictions``, ``shadow`` and ``batches`` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- in -------------------------------------------------------------------------------

    def add_batches(self, batches: Sequence[tuple[str, wire.TelemetryBatch, float]]) -> list[bool]:
        """(device, batch, receive time), each once: keyed by (device, session, seq); which were new (False: stored
        before, sent again). The rows of the new ones go in by one bulk write per table (COPY on PostgreSQL)."""
        keys = [{"device": d, "session": b.session, "seq": b.seq, "ts": received} for d, b, received in batches]
        new = self.db.insert_new("batches", keys)
        telemetry: list[tuple[Any, ...]] = []
        predictions: list[tuple[Any, ...]] = []
        shadow: list[tuple[Any, ...]] = []
        for (device, batch, received), is_new in zip(batches, new):
            if not is_new:
                continue
            for w in batch.models:
                telemetry.append(_telemetry_row(w, device, batch, received))
                if w.predictions is not None:
                    p = w.predictions
                    classes = json.dumps(p.classes) if p.classes is not None else None
                    predictions.append((device, received, w.model, w.version, p.rows, p.values, p.sum, p.sumsq, classes))
                if w.shadow is not None:
                    sh = w.shadow
                    compared = (sh.version, sh.compared, sh.agreed, sh.abs_diff_sum, sh.values, sh.mismatched, sh.errors, sh.skipped)
                    shadow.append((device, received, w.model, w.version, *compared, sh.p95_ms, sh.active_p95_ms))
        self.db.copy("telemetry", TELEMETRY_COLUMNS, telemetry)
        self.db.copy("predictions", PREDICTION_COLUMNS, predictions)
        self.db.copy("shadow", SHADOW_COLUMNS, shadow)
        return new

    def add_totals(self, batches: Iterable[wire.TelemetryBatch]) -> None:
        """The answered calls and errors of ``batches`` (those just stored) added to each model version's totals.

        Last in the ingest's transaction, in key order: on PostgreSQL the rows stay locked until the commit, and two
        controllers' flushes then wait for each other only that briefly, never in a cycle."""
        totals: dict[tuple[str, str], list[int]] = {}
        for batch in batches:
            for w in batch.models:
                server, client = _split_errors(w)
                t = totals.setdefault((w.model, w.version), [0, 0, 0])
                t[0], t[1], t[2] = t[0] + w.count, t[1] + server, t[2] + client
        for (model, version), (requests, errors, client_errors) in sorted(totals.items()):
            self.db.execute(
                "INSERT INTO model_totals (model, version, requests, errors, client_errors) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (model, version) DO UPDATE SET requests = model_totals.requests + excluded.requests,"
                " errors = model_totals.errors + excluded.errors, client_errors = model_totals.client_errors + excluded.client_errors",
                [model, version, requests, errors, client_errors],
            )

    def prune(self, keep_s: float) -> int:
        """Rows older than ``keep_s`` (receive time) go; returns how many telemetry rows went. A model version's totals
        go with its last telemetry row: a device naming ever-new versions must not grow ``/metrics`` for good."""
        cutoff = time.time() - keep_s
        for table in ("predictions", "shadow", "batches"):
            self.db.remove_before(table, cutoff)
        removed = self.db.remove_before("telemetry", cutoff)
        if removed:
            self.db.execute(
                "DELETE FROM model_totals WHERE NOT EXISTS"
                " (SELECT 1 FROM telemetry t WHERE t.model = model_totals.model AND t.version = model_totals.version)"
            )
        return removed

    # -- rows -----------------------------------------------------------------------------

    def recent(self, device: str, limit: int = 20) -> list[dict[str, Any]]:
        return self.db.query(
            "SELECT seq, ts, model, version, requests, errors, p95_ms FROM telemetry WHERE device = ? ORDER BY ts DESC LIMIT ?",
            [device, limit],
        )

    def count(self) -> int:
        return int(self.db.query("SELECT count(*) AS n FROM telemetry")[0]["n"])

    def telemetry_rows(self, model: str, devices: Iterable[str], since: float) -> list[TelemetryRow]:
        columns = "device, ts, version, requests, errors AS server_errors, coalesce(client_errors, 0) AS client_errors, p95_ms"
        names = _Names()
        return [
            TelemetryRow(
                names(r["device"]), r["ts"], names(r["version"]), r["requests"], r["server_errors"], r["client_errors"], r["p95_ms"]
            )
            for part in self._of_devices(f"SELECT {columns} FROM telemetry", model, devices, since)
            for r in part
        ]

    def prediction_rows(self, model: str, devices: Iterable[str], since: float) -> list[PredictionRow]:
        columns = 'device, ts, version, rows, n AS "values", total, total_sq, classes'
        names = _Names()
        return [
            PredictionRow(
                names(r["device"]),
                r["ts"],
                names(r["version"]),
                r["rows"],
                r["values"],
                r["total"],
                r["total_sq"],
                json.loads(r["classes"]) if r["classes"] else None,
            )
            for part in self._of_devices(f"SELECT {columns} FROM predictions", model, devices, since)
            for r in part
        ]

    def last_reports(self, model: str, version: str, devices: Iterable[str], since: float, until: float) -> dict[str, float]:
        """Per device: the receive time of its newest telemetry on ``model`` ``version`` in ``[since, until)`` (one
        row each, aggregated in SQL; devices with none are left out)."""
        out: dict[str, float] = {}
        for part in self.db.chunks(sorted(set(devices))):
            where, args = self.db.in_list("device", part)
            rows = self.db.query(
                f"SELECT device, max(ts) AS ts FROM telemetry WHERE model = ? AND version = ? AND ts >= ? AND ts < ? AND {where} "
                "GROUP BY device",
                [model, version, since, until, *args],
            )
            out.update({r["device"]: float(r["ts"]) for r in rows})
        return out

    def _of_devices(self, select: str, model: str, devices: Iterable[str], since: float) -> Iterator[list[dict[str, Any]]]:
        """The rows of ``devices``, ``ROWS_PART`` devices' at a time: the caller turns each part into its own rows
        before the next is read, so the database's rows (a dict each) never exist for the whole fleet at once."""
        chosen: Sequence[str] = sorted(set(devices))
        for i in range(0, len(chosen), ROWS_PART):
            for part in self.db.chunks(chosen[i : i + ROWS_PART]):
                where, args = self.db.in_list("device", part)
                yield self.db.query(f"{select} WHERE model = ? AND ts >= ? AND {where}", [model, since, *args])

    # -- aggregates -----------------------------------------------------------------------

    def health(self, model: str, version: str, since: float, devices: Iterable[str] | None = None) -> Health:
        where, args = _window(self.db, model, version, since, devices)
        select = "sum(requests) AS requests, sum(errors) AS errors, count(DISTINCT device) AS devices"
        row = self.db.query(f"SELECT {select} FROM telemetry WHERE {where}", args)[0]
        p95 = _median(r["p95_ms"] for r in self.db.query(f"SELECT p95_ms FROM telemetry WHERE {where} AND p95_ms IS NOT NULL", args))
        return Health(int(row["requests"] or 0), int(row["errors"] or 0), p95, int(row["devices"] or 0))

    def distribution(self, model: str, version: str, since: float, devices: Iterable[str] | None = None) -> Distribution:
        where, args = _window(self.db, model, version, since, devices)
        select = "sum(rows) AS rows, sum(n) AS n, sum(total) AS total, sum(total_sq) AS total_sq, count(DISTINCT device) AS devices"
        row = self.db.query(f"SELECT {select} FROM predictions WHERE {where}", args)[0]
        class_rows = [r["classes"] for r in self.db.query(f"SELECT classes FROM predictions WHERE {where} AND classes IS NOT NULL", args)]
        rows, n, total, total_sq = int(row["rows"] or 0), int(row["n"] or 0), float(row["total"] or 0.0), float(row["total_sq"] or 0.0)
        mean = total / n if n else None
        std = max(total_sq / n - mean * mean, 0.0) ** 0.5 if n and mean is not None else None
        classes: list[int] | None = None
        for text in class_rows:
            classes = add_class_counts(classes, json.loads(text))
        return Distribution(rows, n, mean, std, classes, int(row["devices"] or 0))

    def shadow_health(self, model: str, shadow_version: str, since: float, devices: Iterable[str] | None = None) -> ShadowHealth:
        where, args = _window(self.db, model, shadow_version, since, devices, version_column="shadow_version")
        sums = ", ".join(f"sum({c}) AS {c}" for c in ("compared", "agreed", "abs_diff_sum", "n", "errors", "skipped", "mismatched"))
        row = self.db.query(f"SELECT {sums}, count(DISTINCT device) AS devices FROM shadow WHERE {where}", args)[0]
        latencies = self.db.query(f"SELECT p95_ms, active_p95_ms FROM shadow WHERE {where} AND p95_ms IS NOT NULL", args)
        n = int(row["n"] or 0)
        return ShadowHealth(
            compared=int(row["compared"] or 0),
            agreed=int(row["agreed"] or 0),
            mean_abs_diff=float(row["abs_diff_sum"] or 0.0) / n if n else None,
            errors=int(row["errors"] or 0),
            skipped=int(row["skipped"] or 0),
            mismatched=int(row["mismatched"] or 0),
            p95_ms=_median(r["p95_ms"] for r in latencies),
            active_p95_ms=_median(r["active_p95_ms"] for r in latencies if r["active_p95_ms"] is not None),
            devices=int(row["devices"] or 0),
        )

    def series(self, since: float, bucket_s: float = 10.0) -> list[dict[str, Any]]:
        """Per model version and time bucket: requests, error rate, the median of the devices' p95s (the dashboard's charts)."""
        rows = self.db.query(
            f"SELECT model, version, {self.db.bucket('ts', 'bucket_s')} AS b, sum(requests) AS requests, sum(errors) AS errors,"
            " max(p95_ms) AS p95_ms FROM telemetry WHERE ts >= :since GROUP BY model, version, b, device ORDER BY b",
            {"bucket_s": bucket_s, "since": since},
        )
        buckets: dict[tuple[str, str, int], tuple[list[int], list[float]]] = {}
        for row in rows:
            sums, p95s = buckets.setdefault((row["model"], row["version"], row["b"]), ([0, 0], []))
            sums[0] += row["requests"] or 0
            sums[1] += row["errors"] or 0
            if row["p95_ms"] is not None:
                p95s.append(row["p95_ms"])
        out = []
        for (model, version, b), ((requests, errors), p95s) in sorted(buckets.items(), key=lambda kv: kv[0][2]):
            total = requests + errors
            out.append(
                {
                    "model": model,
                    "version": version,
                    "t": b * bucket_s,
                    "requests": requests,
                    "error_rate": errors / total if total else 0.0,
                    "p95_ms": _median(p95s),
                }
            )
        return out


ROWS_PART = 250  # devices per query of the gate's rows: about 15,000 rows at 600 s of baseline and 10 s telemetry


class _Names:
    """One string object per distinct device id or version among many rows (each row's own copy: ~60 bytes apiece)."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        return self._seen.setdefault(name, name)
