"""The controller's store: devices, telemetry, rollouts — SQLite (WAL) through sqlite-utils, behind this one class.

Why one class: everything the controller knows goes through these methods, so a
fleet that outgrows one machine swaps this module for PostgreSQL and nothing else.
Telemetry arrives in batches and is written one transaction per batch, never per
message (10,000+ messages/s on a Pi-class disk needs that).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from agent import wire

__all__ = ["Device", "Distribution", "FleetStore", "Health", "PredictionRow", "ShadowHealth", "TelemetryRow"]


@dataclass
class Device:
    id: str
    online: bool = False
    session: int = 0
    last_seen: float = 0.0
    hardware: str = ""
    runtimes: dict[str, str] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {version, variant, runtime, ...}
    tags: dict[str, str] = field(default_factory=dict)
    update: dict[str, Any] = field(default_factory=dict)
    preferred_variants: list[str] = field(default_factory=list)  # what the device says it runs best, best first

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class TelemetryRow:
    """One device's telemetry for one model version in one batch; ``ts`` is when the controller received it."""

    device: str
    ts: float
    version: str
    requests: int
    server_errors: int
    client_errors: int
    p95_ms: float | None


@dataclass(frozen=True)
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


class FleetStore:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        self.duplicates = 0  # telemetry batches received again (same device, session, seq) and not stored twice
        self.rejected = 0  # messages the store could not take (the wire let them through): skipped, counted
        self.last_rejection = ""
        deadline = time.monotonic() + 30
        while True:  # another process (the CLI beside `fleet serve`) may be creating the schema right now
            try:
                self._schema()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _schema(self) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # the controller can re-derive state from the devices' retained messages
        t = self.db.table
        t("devices").create(
            {
                "id": str,
                "online": int,
                "session": int,
                "last_seen": float,
                "hardware": str,
                "runtimes": str,
                "models": str,
                "tags": str,
                "update": str,
                "preferred_variants": str,
            },
            pk="id",
            if_not_exists=True,
        )
        t("telemetry").create(
            {
                "device": str,
                "seq": int,
                "ts": float,  # the controller's receive time: a device's clock decides nothing
                "model": str,
                "version": str,
                "requests": int,
                "errors": int,  # server-side only: these count against the version
                "p95_ms": float,
                "client_errors": int,
                "session": int,
                "device_ts": float,
            },
            if_not_exists=True,
        )
        if "session" not in t("telemetry").columns_dict:  # a store from before the wire contract
            for column, kind in (("client_errors", int), ("session", int), ("device_ts", float)):
                t("telemetry").add_column(column, kind)
            # its rows carry the devices' clocks: none may stay in the future, past retention (the gates skip them)
            self.db.execute("UPDATE telemetry SET ts = min(ts, ?)", [time.time()])
        t("batches").create({"device": str, "session": int, "seq": int, "ts": float}, pk=("device", "session", "seq"), if_not_exists=True)
        self.db.execute("CREATE INDEX IF NOT EXISTS batches_ts ON batches (ts)")
        self.db.execute("CREATE INDEX IF NOT EXISTS telemetry_ts ON telemetry (ts)")
        self.db.execute("CREATE INDEX IF NOT EXISTS telemetry_model ON telemetry (model, version, ts)")
        self.db.execute("CREATE INDEX IF NOT EXISTS telemetry_device ON telemetry (device, model, ts)")
        t("predictions").create(
            {
                "device": str,
                "ts": float,
                "model": str,
                "version": str,
                "rows": int,
                "n": int,
                "total": float,
                "total_sq": float,
                "classes": str,
            },
            if_not_exists=True,
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS predictions_model ON predictions (model, version, ts)")
        self.db.execute("CREATE INDEX IF NOT EXISTS predictions_device ON predictions (device, model, ts)")
        t("shadow").create(
            {
                "device": str,
                "ts": float,
                "model": str,
                "version": str,
                "shadow_version": str,
                "compared": int,
                "agreed": int,
                "abs_diff_sum": float,
                "n": int,
                "mismatched": int,
                "errors": int,
                "skipped": int,
                "p95_ms": float,
                "active_p95_ms": float,
            },
            if_not_exists=True,
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS shadow_model ON shadow (model, shadow_version, ts)")
        t("jobs").create(
            {"device": str, "job": str, "target": str, "state": str, "reason": str, "ts": float}, pk=("device", "job"), if_not_exists=True
        )
        t("rollouts").create(
            {
                "id": int,
                "spec": str,
                "state": str,
                "wave": int,
                "reason": str,
                "created": float,
                "updated": float,
                "wave_started": float,
                "wave_done": float,
                "phase": str,
            },
            pk="id",
            if_not_exists=True,
        )
        if "phase" not in t("rollouts").columns_dict:  # a store from before shadow mode
            t("rollouts").add_column("phase", str, not_null_default="")
        t("rollout_devices").create(
            {
                "rollout": int,
                "device": str,
                "wave": int,
                "state": str,
                "previous": str,
                "variant": str,
                "assigned_at": float,
                "reason": str,
                "hardware": str,  # as the device reported it when the rollout started: what the gates group by
            },
            pk=("rollout", "device"),
            if_not_exists=True,
        )
        if "hardware" not in t("rollout_devices").columns_dict:  # a store from before per-device gates
            t("rollout_devices").add_column("hardware", str, not_null_default="")

    def close(self) -> None:
        self.db.close()

    # -- ingest: one transaction per batch ------------------------------------------------

    def ingest(self, messages: Iterable[tuple[str, wire.WireModel, float]]) -> int:
        """(device, decoded message, receive time) — decoded by ``wire.decode_device_message``; returns how many were stored.

        One transaction for the batch. A telemetry batch already stored (same device, session and
        seq: re-sent after a lost acknowledgement) is counted in ``duplicates`` and not stored again.
        """
        n = duplicates = 0
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            devices: dict[str, Device] = {}
            for device, message, received in messages:
                self.db.execute("SAVEPOINT one")
                try:
                    stored = self._one(devices, device, message, received)
                except (sqlite3.Error, TypeError, ValueError) as exc:  # one message's trouble is not the batch's
                    self.db.execute("ROLLBACK TO one")
                    self.rejected += 1
                    self.last_rejection = f"{device}: {type(exc).__name__}: {exc}"[:300]
                    continue
                finally:
                    self.db.execute("RELEASE one")
                n += stored
                duplicates += not stored and isinstance(message, wire.TelemetryBatch)
            for d in devices.values():
                self._write_device(d)
        self.duplicates += duplicates  # counted once the transaction holds
        return n

    def _write_device(self, d: Device) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                d.id,
                int(d.online),
                d.session,
                d.last_seen,
                d.hardware,
                json.dumps(d.runtimes),
                json.dumps(d.models),
                json.dumps(d.tags),
                json.dumps(d.update),
                json.dumps(d.preferred_variants),
            ],
        )

    def _one(self, devices: dict[str, Device], device: str, message: wire.WireModel, received: float) -> bool:
        if isinstance(message, wire.TelemetryBatch):
            return self._telemetry(device, message, received)
        if isinstance(message, (wire.JobUpdate, wire.UpdateCheck)):
            job_id, target = (message.id, message.target_path) if isinstance(message, wire.JobUpdate) else ("check", "")
            row = [device, job_id, target, message.state, message.reason, received]
            self.db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?)", row)
            return True
        d = devices.get(device) or self._device(device) or Device(device)
        if isinstance(message, wire.Status):
            if message.state == "lost" and message.session < d.session:
                return False  # a late will of an earlier session: the device is back already
            d.session = max(d.session, message.session)
            d.online = message.state == "ready"
        elif isinstance(message, wire.Reported):
            d.hardware, d.runtimes = message.hardware, dict(message.runtimes)
            d.models = {name: m.model_dump(exclude_none=True) for name, m in message.models.items()}
            d.update = message.update.model_dump(exclude_none=True) if message.update else {}
            d.preferred_variants = list(message.preferred_variants)
        else:
            raise TypeError(f"not a device message: {type(message).__name__}")
        d.last_seen = received
        devices[device] = d
        return True

    def _telemetry(self, device: str, batch: wire.TelemetryBatch, received: float) -> bool:
        """One batch, once: keyed by (device, session, seq), stamped with the controller's receive time."""
        fresh = self.db.execute("INSERT OR IGNORE INTO batches VALUES (?, ?, ?, ?)", [device, batch.session, batch.seq, received])
        if not fresh.rowcount:
            return False
        for w in batch.models:
            server = wire.telemetry.server_errors(w.errors)
            self.db.execute(
                "INSERT INTO telemetry (device, seq, ts, model, version, requests, errors, p95_ms, client_errors, session, device_ts)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    device,
                    batch.seq,
                    received,
                    w.model,
                    w.version,
                    w.count,
                    server,
                    w.p95_ms,
                    sum(w.errors.values()) - server,
                    batch.session,
                    batch.ts,
                ],
            )
            if w.predictions is not None:
                p = w.predictions
                classes = json.dumps(p.classes) if p.classes is not None else None
                row = [device, received, w.model, w.version, p.rows, p.values, p.sum, p.sumsq, classes]
                self.db.execute("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            if w.shadow is not None:
                sh = w.shadow
                row = [
                    device,
                    received,
                    w.model,
                    w.version,
                    sh.version,
                    sh.compared,
                    sh.agreed,
                    sh.abs_diff_sum,
                    sh.values,
                    sh.mismatched,
                    sh.errors,
                    sh.skipped,
                    sh.p95_ms,
                    sh.active_p95_ms,
                ]
                self.db.execute(f"INSERT INTO shadow VALUES ({', '.join('?' for _ in row)})", row)
        return True

    def prune_telemetry(self, keep_s: float) -> int:
        with self._lock:
            cutoff = time.time() - keep_s
            for table in ("predictions", "shadow", "batches"):
                self.db.execute(f"DELETE FROM {table} WHERE ts < ?", [cutoff])
            return int(self.db.execute("DELETE FROM telemetry WHERE ts < ?", [cutoff]).rowcount)

    # -- devices ------------------------------------------------------------------------------

    def _device(self, device_id: str) -> Device | None:
        row = self.db.execute("SELECT * FROM devices WHERE id = ?", [device_id]).fetchone()
        return _device(row) if row else None

    def device(self, device_id: str) -> Device | None:
        with self._lock:
            return self._device(device_id)

    def devices(self) -> list[Device]:
        with self._lock:
            return [_device(r) for r in self.db.execute("SELECT * FROM devices ORDER BY id")]

    def tag(self, device_id: str, tags: dict[str, str]) -> Device:
        """Set tags (an empty value removes the key); the device need not have reported yet."""
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            d = self._device(device_id) or Device(device_id)
            d.tags.update({k: v for k, v in tags.items() if v != ""})
            for k in [k for k, v in tags.items() if v == ""]:
                d.tags.pop(k, None)
            self._write_device(d)
            return d

    def jobs(self, device: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute("SELECT job, target, state, reason, ts FROM jobs WHERE device = ? ORDER BY ts", [device]).fetchall()
        return [{"job": r[0], "target": r[1], "state": r[2], "reason": r[3], "ts": r[4]} for r in rows]

    def last_job(self, device: str, target: str) -> dict[str, Any] | None:
        with self._lock:
            r = self.db.execute(
                "SELECT state, reason, ts FROM jobs WHERE device = ? AND target = ? ORDER BY ts DESC LIMIT 1", [device, target]
            ).fetchone()
        return {"state": r[0], "reason": r[1], "ts": r[2]} if r else None

    def recent_telemetry(self, device: str, limit: int = 20) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute(
                "SELECT seq, ts, model, version, requests, errors, p95_ms FROM telemetry WHERE device = ? ORDER BY ts DESC LIMIT ?",
                [device, limit],
            ).fetchall()
        keys = ("seq", "ts", "model", "version", "requests", "errors", "p95_ms")
        return [dict(zip(keys, r)) for r in rows]

    def telemetry_count(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT count(*) FROM telemetry").fetchone()[0])

    # -- aggregates ---------------------------------------------------------------------------

    def health(self, model: str, version: str, since: float, devices: Iterable[str] | None = None) -> Health:
        """The model version's requests, errors and p95 since ``since`` (optionally on these devices only)."""
        where, args = self._window(model, version, since, devices)
        with self._lock:
            row = self.db.execute(
                f"SELECT sum(requests), sum(errors), count(DISTINCT device) FROM telemetry WHERE {where}", args
            ).fetchone()
            p95s = sorted(r[0] for r in self.db.execute(f"SELECT p95_ms FROM telemetry WHERE {where} AND p95_ms IS NOT NULL", args))
        p95 = p95s[len(p95s) // 2] if p95s else None
        return Health(int(row[0] or 0), int(row[1] or 0), p95, int(row[2] or 0))

    @staticmethod
    def _window(
        model: str, version: str, since: float, devices: Iterable[str] | None, version_column: str = "version"
    ) -> tuple[str, list[Any]]:
        """The WHERE clause of one model version's rows since ``since``, on ``devices`` when given (none: no rows)."""
        where, args = f"model = ? AND {version_column} = ? AND ts >= ?", [model, version, since]
        if devices is not None:
            chosen = list(devices)
            where += f" AND device IN ({', '.join('?' for _ in chosen)})" if chosen else " AND 0"
            args += chosen
        return where, args

    def telemetry_rows(self, model: str, devices: Iterable[str], since: float) -> list[TelemetryRow]:
        """Every telemetry row of ``model`` on these devices since ``since`` (receive time), any version: the gates' input."""
        return [
            TelemetryRow(*r)
            for r in self._rows_of_devices(
                "SELECT device, ts, version, requests, errors, coalesce(client_errors, 0), p95_ms FROM telemetry", model, devices, since
            )
        ]

    def prediction_rows(self, model: str, devices: Iterable[str], since: float) -> list[PredictionRow]:
        """Every prediction-sum row of ``model`` on these devices since ``since``, any version."""
        return [
            PredictionRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]) if r[7] else None)
            for r in self._rows_of_devices(
                "SELECT device, ts, version, rows, n, total, total_sq, classes FROM predictions", model, devices, since
            )
        ]

    def _rows_of_devices(self, select: str, model: str, devices: Iterable[str], since: float, legacy: bool = True) -> list[tuple[Any, ...]]:
        """``legacy=False`` leaves out rows stored before the wire contract (device clock, client errors mixed in)."""
        chosen, out = sorted(set(devices)), []
        current = "" if legacy else " AND session IS NOT NULL"
        with self._lock:
            for i in range(0, len(chosen), 500):  # SQLite's limit on bound variables
                part = chosen[i : i + 500]
                marks = ", ".join("?" for _ in part)
                where = f"model = ? AND ts >= ? AND device IN ({marks}){current}"
                out += self.db.execute(f"{select} WHERE {where}", [model, since, *part]).fetchall()
        return out

    def distribution(self, model: str, version: str, since: float, devices: Iterable[str] | None = None) -> Distribution:
        """What ``version`` answered since ``since`` (optionally on these devices only), from the devices' prediction sums."""
        where, args = self._window(model, version, since, devices)
        with self._lock:
            row = self.db.execute(
                f"SELECT sum(rows), sum(n), sum(total), sum(total_sq), count(DISTINCT device) FROM predictions WHERE {where}", args
            ).fetchone()
            class_rows = [r[0] for r in self.db.execute(f"SELECT classes FROM predictions WHERE {where} AND classes IS NOT NULL", args)]
        rows, n, total, total_sq = int(row[0] or 0), int(row[1] or 0), float(row[2] or 0.0), float(row[3] or 0.0)
        mean = total / n if n else None
        std = max(total_sq / n - mean * mean, 0.0) ** 0.5 if n and mean is not None else None
        classes: list[int] | None = None
        for counts in (json.loads(text) for text in class_rows):
            if classes is None:
                classes = counts
            elif len(classes) == len(counts):  # another width (a different output shape) is not comparable: left out
                classes = [a + b for a, b in zip(classes, counts)]
        return Distribution(rows, n, mean, std, classes, int(row[4] or 0))

    def shadow_health(self, model: str, shadow_version: str, since: float, devices: Iterable[str] | None = None) -> ShadowHealth:
        """How ``shadow_version``, run in shadow, agreed with the serving version since ``since``."""
        where, args = self._window(model, shadow_version, since, devices, version_column="shadow_version")
        with self._lock:
            row = self.db.execute(
                "SELECT sum(compared), sum(agreed), sum(abs_diff_sum), sum(n), sum(errors), sum(skipped), sum(mismatched),"
                f" count(DISTINCT device) FROM shadow WHERE {where}",
                args,
            ).fetchone()
            latencies = self.db.execute(f"SELECT p95_ms, active_p95_ms FROM shadow WHERE {where} AND p95_ms IS NOT NULL", args).fetchall()
        n = int(row[3] or 0)
        shadow_p95 = sorted(r[0] for r in latencies)
        active_p95 = sorted(r[1] for r in latencies if r[1] is not None)
        return ShadowHealth(
            int(row[0] or 0),
            int(row[1] or 0),
            float(row[2] or 0.0) / n if n else None,
            int(row[4] or 0),
            int(row[5] or 0),
            int(row[6] or 0),
            shadow_p95[len(shadow_p95) // 2] if shadow_p95 else None,
            active_p95[len(active_p95) // 2] if active_p95 else None,
            int(row[7] or 0),
        )

    def series(self, since: float, bucket_s: float = 10.0) -> list[dict[str, Any]]:
        """Per model version and time bucket: requests, errors, the median of the devices' p95s (the dashboard's charts)."""
        with self._lock:
            rows = self.db.execute(
                "SELECT model, version, CAST(ts / ? AS INTEGER) AS b, sum(requests), sum(errors), p95_ms FROM telemetry"
                " WHERE ts >= ? GROUP BY model, version, b, device ORDER BY b",
                [bucket_s, since],
            ).fetchall()
        buckets: dict[tuple[str, str, int], list[Any]] = {}
        for model, version, b, requests, errors, p95 in rows:
            acc = buckets.setdefault((model, version, b), [0, 0, []])
            acc[0] += requests or 0
            acc[1] += errors or 0
            if p95 is not None:
                acc[2].append(p95)
        out = []
        for (model, version, b), (requests, errors, p95s) in sorted(buckets.items(), key=lambda kv: kv[0][2]):
            p95s.sort()
            total = requests + errors
            out.append(
                {
                    "model": model,
                    "version": version,
                    "t": b * bucket_s,
                    "requests": requests,
                    "error_rate": errors / total if total else 0.0,
                    "p95_ms": p95s[len(p95s) // 2] if p95s else None,
                }
            )
        return out

    # -- rollouts -----------------------------------------------------------------------------

    def create_rollout(self, spec: dict[str, Any], waves: list[list[tuple[str, str, str, str]]], phase: str = "") -> int:
        """A rollout and its devices (per wave: device, previous version, variant, hardware), in one transaction.

        ``phase`` "shadow": the first wave runs the new version in shadow before any device switches.
        """
        now = time.time()
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute(
                "INSERT INTO rollouts (spec, state, wave, reason, created, updated, wave_started, wave_done, phase)"
                " VALUES (?, 'running', 0, '', ?, ?, ?, 0, ?)",
                [json.dumps(spec), now, now, now, phase],
            )
            rid = int(cur.lastrowid or 0)
            for w, members in enumerate(waves):
                for device, previous, variant, hardware in members:
                    self.db.execute(
                        "INSERT INTO rollout_devices (rollout, device, wave, state, previous, variant, assigned_at, reason, hardware)"
                        " VALUES (?, ?, ?, 'pending', ?, ?, 0, '', ?)",
                        [rid, device, w, previous, variant, hardware],
                    )
            return rid

    def rollout(self, rid: int) -> dict[str, Any] | None:
        with self._lock:
            r = self.db.execute(
                "SELECT id, spec, state, wave, reason, created, updated, wave_started, wave_done, phase FROM rollouts WHERE id = ?", [rid]
            ).fetchone()
        if r is None:
            return None
        keys = ("id", "spec", "state", "wave", "reason", "created", "updated", "wave_started", "wave_done", "phase")
        out = dict(zip(keys, r))
        out["spec"] = json.loads(r[1])
        return out

    def rollouts(self) -> list[dict[str, Any]]:
        with self._lock:
            ids = [r[0] for r in self.db.execute("SELECT id FROM rollouts ORDER BY id")]
        return [r for r in (self.rollout(i) for i in ids) if r is not None]

    def update_rollout(self, rid: int, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self.db.execute(f"UPDATE rollouts SET {sets}, updated = ? WHERE id = ?", [*fields.values(), time.time(), rid])

    def rollout_devices(self, rid: int, wave: int | None = None) -> list[dict[str, Any]]:
        where, args = ("rollout = ?", [rid]) if wave is None else ("rollout = ? AND wave = ?", [rid, wave])
        with self._lock:
            rows = self.db.execute(
                "SELECT device, wave, state, previous, variant, assigned_at, reason, hardware FROM rollout_devices"
                f" WHERE {where} ORDER BY device",
                args,
            ).fetchall()
        keys = ("device", "wave", "state", "previous", "variant", "assigned_at", "reason", "hardware")
        return [dict(zip(keys, r)) for r in rows]

    def set_device_states(self, rid: int, changes: list[tuple[str, str, str, float | None]]) -> None:
        """(device, state, reason, assigned_at or None to keep) for many devices in one transaction."""
        if not changes:
            return
        with self._lock, self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            for device, state, reason, assigned_at in changes:
                if assigned_at is None:
                    self.db.execute(
                        "UPDATE rollout_devices SET state = ?, reason = ? WHERE rollout = ? AND device = ?", [state, reason, rid, device]
                    )
                else:
                    self.db.execute(
                        "UPDATE rollout_devices SET state = ?, reason = ?, assigned_at = ? WHERE rollout = ? AND device = ?",
                        [state, reason, assigned_at, rid, device],
                    )


def _device(row: tuple[Any, ...]) -> Device:
    return Device(
        row[0],
        bool(row[1]),
        int(row[2]),
        float(row[3]),
        row[4],
        json.loads(row[5]),
        json.loads(row[6]),
        json.loads(row[7]),
        json.loads(row[8]),
        json.loads(row[9] or "[]"),
    )
