"""The health gate's windows summed by the database (``fleet.store.windows``), on real SQLite and real PostgreSQL,
against the definition written out here in Python over the very rows the store holds: every count and sum, the
median of the batches' p95s (odd, even, none, some batches without one), class counts in receive order with
rows of another width left out, and the windows' edges (a row at ``since`` is in, at ``until`` out)."""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from update_rig import wait_for

from agent import wire
from fleet.store import FleetStore, PredictionRow, TelemetryRow, Window
from fleet.store import windows as window_sums

VERSIONS = ("1.0.0", "2.0.0")
T0 = 1_700_000_000.0


@pytest.fixture
def store(store_location: Path | str) -> Iterator[FleetStore]:
    """A store on SQLite, then on PostgreSQL (``store_location`` runs each test on both)."""
    fs = FleetStore(store_location)
    yield fs
    fs.close()


def reference(telemetry: list[TelemetryRow], predictions: list[PredictionRow], w: Window) -> dict[str, Any] | None:
    """The definition: one device's rows on one version received in ``[since, until)``, summed; None without rows."""
    t = [r for r in telemetry if r.device == w.device and r.version == w.version and w.since <= r.ts < w.until]
    mine = (r for r in predictions if r.device == w.device and r.version == w.version and w.since <= r.ts < w.until)
    p = sorted(mine, key=lambda r: r.ts)
    p95s = [r.p95_ms for r in t if r.p95_ms is not None]
    classes: list[int] | None = None
    for r in p:
        if r.classes is None:
            continue
        if classes is None:
            classes = list(r.classes)
        elif len(classes) == len(r.classes):
            classes = [a + b for a, b in zip(classes, r.classes)]
    return {
        "telemetry": (len(t), sum(r.requests for r in t), sum(r.server_errors for r in t), sum(r.client_errors for r in t)) if t else None,
        "p95_ms": statistics.median(p95s) if p95s else None,
        "predictions": (len(p), sum(r.rows for r in p), sum(r.values for r in p), sum(r.total for r in p), sum(r.total_sq for r in p))
        if p
        else None,
        "classes": tuple(classes) if classes is not None else None,
    }


def batch(rng: random.Random, device: str, seq: int, received: float) -> tuple[str, wire.WireModel, float]:
    """One device's telemetry batch: both versions sometimes, p95 sometimes missing, prediction sums sometimes, with
    class counts of two widths (an output shape that changed)."""
    models = []
    for version in rng.sample(VERSIONS, rng.randint(1, 2)):
        m: dict[str, Any] = {"model": "m", "version": version, "count": rng.randint(0, 500)}
        m["errors"] = {"internal": rng.randint(0, 5), "bad_request": rng.randint(0, 3)}
        if rng.random() < 0.8:
            m["p95_ms"] = round(rng.uniform(0.5, 50.0), 3)
        if rng.random() < 0.7:
            rows = rng.randint(1, 100)
            m["predictions"] = {"output": "y", "rows": rows, "values": rows * 3, "sum": rng.uniform(-5, 5), "sumsq": rng.uniform(0, 50)}
            if rng.random() < 0.8:
                m["predictions"]["classes"] = [rng.randint(0, 9) for _ in range(3 if rng.random() < 0.85 else 4)]
        models.append(m)
    body = {
        "device_id": device,
        "session": 1,
        "seq": seq,
        "ts": received,
        "interval_s": 10.0,
        "dropped_total": 0,
        "models": models,
        "throughput_rps": 1.0,
        "queue_depth": 0,
        "system": {"cpu_percent": 1.0, "process_cpu_percent": 1.0, "rss_bytes": 1, "memory_percent": 1.0},
    }
    topic = wire.parse_device_topic(wire.device_topic(device, "telemetry"))
    return device, wire.decode_device_message(topic, json.dumps(body).encode()), received


def check(store: FleetStore, windows: list[Window], devices: list[str]) -> None:
    telemetry = store.telemetry_rows("m", devices, 0)
    predictions = store.prediction_rows("m", devices, 0)
    got_t = store.window_telemetry("m", windows)
    got_p = store.window_predictions("m", windows)
    for w in windows:
        want = reference(telemetry, predictions, w)
        assert want is not None
        t, p = got_t.get(w), got_p.get(w)
        if want["telemetry"] is None:
            assert t is None, w
        else:
            assert t is not None and (t.batches, t.requests, t.server_errors, t.client_errors) == want["telemetry"], w
            assert (t.p95_ms is None) == (want["p95_ms"] is None) and (t.p95_ms is None or math.isclose(t.p95_ms, want["p95_ms"])), w
        if want["predictions"] is None:
            assert p is None, w
        else:
            assert p is not None and (p.batches, p.rows, p.values) == want["predictions"][:3], w
            assert math.isclose(p.total, want["predictions"][3], abs_tol=1e-9) and math.isclose(p.total_sq, want["predictions"][4]), w
            assert p.classes == want["classes"], w


def test_windows_summed_by_the_database_match_the_definition(store: FleetStore) -> None:
    rng = random.Random(7)
    devices = [f"dev-{i}" for i in range(6)]
    batches = [batch(rng, d, seq, T0 + 10.0 * seq + i) for i, d in enumerate(devices) for seq in range(1, 31)]
    assert store.ingest(batches) == len(batches)
    edges = [T0 + 10.0 * seq + i for i in range(len(devices)) for seq in (1, 8, 15, 30)]  # exactly a row's receive time
    windows = [Window(d, v, T0, T0 + 1000.0) for d in devices for v in VERSIONS]  # whole: every row of the device
    windows += [Window(d, v, lo, hi) for d in devices for v in VERSIONS for lo, hi in ((edges[0], edges[5]), (edges[6], edges[20]))]
    for _ in range(150):
        lo = T0 + rng.uniform(0, 320)
        windows.append(Window(rng.choice(devices), rng.choice(VERSIONS), lo, lo + rng.uniform(0, 150)))
    windows += [Window("dev-0", "1.0.0", T0 + 100, T0 + 100), Window("never-seen", "1.0.0", T0, T0 + 1000)]  # empty ones
    odd_even = {t.batches % 2 for t in store.window_telemetry("m", windows).values()}
    assert odd_even == {0, 1}  # the median is tried on odd and even counts
    check(store, windows, devices)


def test_more_windows_than_one_query_holds_and_the_same_window_twice(store: FleetStore, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    devices = [f"d{i:03d}" for i in range(50)]
    batches = [batch(rng, d, seq, T0 + 10.0 * seq + i / 100) for i, d in enumerate(devices) for seq in range(1, 6)]
    assert store.ingest(batches) == len(batches)
    windows = [Window(d, v, T0 + lo, T0 + lo + 30) for d in devices for v in VERSIONS for lo in range(0, 50, 5)]
    monkeypatch.setattr(window_sums, "PART", 37)  # 1,000 windows in 28 queries, the last one short
    windows.append(windows[0])  # asked twice (two moved devices' control share a window): one answer, the same
    check(store, windows, devices)
    assert len(store.window_telemetry("m", windows)) <= len(set(windows))


@pytest.mark.parametrize("hostile", ["'; DROP TABLE telemetry; --", '"}], "x": [{"', "x" * 300, "\u00e9\u4e2d\U0001f600", ""])
def test_window_fields_are_bound_never_spliced(store: FleetStore, hostile: str) -> None:
    """A quote, JSON, a long or non-ASCII string in a device id, version or model is a value, never SQL or JSON: rows
    stored under such names (written straight to the table, past the wire's stricter names) are found and summed."""
    from fleet.store.telemetry import PREDICTION_COLUMNS, TELEMETRY_COLUMNS

    with store.db.transaction():
        store.db.ensure_partitions([T0 + 10])
        store.db.copy("telemetry", TELEMETRY_COLUMNS, [(hostile, 1, T0 + 10, hostile, hostile, 7, 2, 3.5, 1, 1, T0 + 10)])
        store.db.copy("predictions", PREDICTION_COLUMNS, [(hostile, T0 + 10, hostile, hostile, 4, 8, 2.0, 3.0, "[1, 3]")])
    w = Window(hostile, hostile, T0, T0 + 100)
    t = store.window_telemetry(hostile, [w, Window("other", hostile, T0, T0 + 100)])
    assert list(t) == [w] and (t[w].batches, t[w].requests, t[w].server_errors, t[w].client_errors, t[w].p95_ms) == (1, 7, 2, 1, 3.5)
    p = store.window_predictions(hostile, [w])
    assert (p[w].rows, p[w].values, p[w].total, p[w].classes) == (4, 8, 2.0, (1, 3))
    assert store.window_telemetry("m", [w]) == {}  # another model: nothing


def test_a_name_with_a_nul_gets_no_sums_and_fails_nothing(store: FleetStore) -> None:
    """PostgreSQL's text cannot hold a NUL (and the wire never lets one in): such a window gets no sums, on both
    stores, instead of failing the query for the windows beside it."""
    store.ingest([batch(random.Random(1), "dev-0", 1, T0 + 10)])
    fine = Window("dev-0", "1.0.0", T0, T0 + 100)
    got = store.window_telemetry("m", [Window("nul\x00id", "1.0.0", T0, T0 + 100), fine])
    assert fine in got and len(got) == 1
    assert store.window_predictions("nul\x00m", [fine]) == {}


def indexes(store: FleetStore) -> set[str]:
    if store.db.dialect == "sqlite":
        return {r["name"] for r in store.db.query("SELECT name FROM sqlite_master WHERE type = 'index'")}
    return {r["indexname"] for r in store.db.query("SELECT indexname FROM pg_indexes WHERE tablename IN ('telemetry', 'predictions')")}


def test_the_windows_are_read_from_their_index_before_any_statistics_exist(store: FleetStore) -> None:
    """With no statistics for a day's partition (autovacuum off, or not there yet) PostgreSQL planned this query on
    (model, version, ts) and scanned every device's rows for each window (minutes at 10,000 devices). The gate's
    read analyzes the partitions its windows span when they have none or are stale, and the plan then uses the
    index that holds every condition."""
    from fleet.store.telemetry import TELEMETRY_COLUMNS

    devices = [f"dev-{i:04d}" for i in range(2000)]
    rows = [(d, k, T0 + 10.0 * k + i / 1e4, "m", "1.0.0", 50, 0, 2.0, 0, 1, T0) for i, d in enumerate(devices) for k in range(150)]
    with store.db.transaction():  # 300,000 rows at once, as a fleet's day fills up before anything analyzed it
        store.db.ensure_partitions([T0, T0 + 1500])
        store.db.copy("telemetry", TELEMETRY_COLUMNS, rows)
    windows = [Window(d, "1.0.0", T0 + 600, T0 + 1200) for d in devices]
    if store.db.dialect == "postgresql":  # once the server counted the rows, the gate's read analyzes their partition
        stats = "SELECT n_mod_since_analyze AS n, last_analyze FROM pg_stat_user_tables WHERE relname LIKE 'telemetry_p%'"
        wait_for(lambda: sum(r["n"] for r in store.db.query(stats)) >= len(rows), 30, "the server's row counts")
        assert all(r["last_analyze"] is None for r in store.db.query(stats))
        assert len(store.window_telemetry("m", windows)) == len(devices)
        assert any(r["last_analyze"] is not None for r in store.db.query(stats))
    sql, args = window_sums.telemetry_query(store.db, "m", windows)
    explain = "EXPLAIN QUERY PLAN " if store.db.dialect == "sqlite" else "EXPLAIN "
    plan = " ".join(str(v) for row in store.db.query(explain + sql, args) for v in row.values())
    assert "telemetry_window" in plan or "device_model_version_ts" in plan, plan  # a partition's copy of it is named so
    assert "telemetry_model" not in plan and "model_version_ts" not in plan.replace("device_model_version_ts", ""), plan


def test_a_store_at_version_3_gets_the_window_indexes_in_place_of_the_old_ones(store_location: Path | str) -> None:
    from fleet.store import open_database, schema

    db = open_database(store_location)
    assert schema.upgrade(db, to=3) == 3
    for name in ("telemetry_window", "predictions_window"):  # as version 3 made them
        db.execute(f"DROP INDEX {name}")
    db.execute("CREATE INDEX telemetry_device ON telemetry (device, model, ts)")
    db.execute("CREATE INDEX predictions_device ON predictions (device, model, ts)")
    db.close()
    fs = FleetStore(store_location)
    try:
        assert schema.version(fs.db) == schema.LATEST
        held = indexes(fs)
        assert {"telemetry_window", "predictions_window"} <= held and not {"telemetry_device", "predictions_device"} & held
        assert fs.ingest([batch(random.Random(2), "dev-0", 1, T0 + 10)]) == 1
    finally:
        fs.close()
