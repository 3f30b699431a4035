"""The controller's store on real SQLite and real PostgreSQL (every test runs on both): prediction sums and shadow
comparisons in, aggregates out, bad input refused whole; schema versions, telemetry retention, store URLs."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import wire
from fleet.store import FleetStore


@pytest.fixture
def store(store_location: Path | str) -> Iterator[FleetStore]:
    fs = FleetStore(store_location)
    yield fs
    fs.close()


def telemetry(
    seq: int, version: str = "1.0.0", predictions: Any = None, shadow: Any = None, rows: int = 10, device: str = "a"
) -> dict[str, Any]:
    model: dict[str, Any] = {"model": "m", "version": version, "count": rows, "errors": {}, "p95_ms": 2.0}
    if predictions is not None:
        model["predictions"] = predictions
    if shadow is not None:
        model["shadow"] = shadow
    return {
        "device_id": device,
        "session": 1,
        "seq": seq,
        "ts": time.time(),
        "interval_s": 10.0,
        "dropped_total": 0,
        "models": [model],
        "throughput_rps": 1.0,
        "queue_depth": 0,
        "system": {"cpu_percent": 1.0, "process_cpu_percent": 1.0, "rss_bytes": 1, "memory_percent": 1.0},
    }


def msg(device: str, kind: str, data: dict[str, Any]) -> tuple[str, wire.WireModel, float]:
    """What the ingest hands the store: the message as a device published it, decoded by the wire, stamped on arrival."""
    if kind == "telemetry":
        data = {**data, "device_id": device}
    topic = wire.parse_device_topic(wire.device_topic(device, kind))
    return device, wire.decode_device_message(topic, json.dumps(data).encode()), time.time()


def reported(device: str, models: dict[str, Any], hardware: str = "x86_64") -> dict[str, Any]:
    return {
        "device_id": device,
        "agent_version": "0.1.0",
        "hardware": hardware,
        "runtimes": {"onnx": "1.20"},
        "preferred_variants": ["onnx-fp32"],
        "models": models,
        "installed": [],
        "ts": time.time(),
    }


def sums(rows: int, mean: float, std: float, classes: list[int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"output": "y", "rows": rows, "values": rows, "sum": rows * mean, "sumsq": rows * (std**2 + mean**2)}
    if classes is not None:
        out["classes"] = classes
    return out


def counts(store: FleetStore) -> tuple[int, int, int]:
    return tuple(int(store.db.query(f"SELECT count(*) AS n FROM {t}")[0]["n"]) for t in ("telemetry", "predictions", "shadow"))  # type: ignore[return-value]


def test_prediction_sums_add_up_across_devices_into_a_distribution(store: FleetStore) -> None:
    store.ingest(
        [
            msg("a", "telemetry", telemetry(1, predictions=sums(100, 1.0, 2.0, [50, 30, 20]))),
            msg("b", "telemetry", telemetry(1, predictions=sums(300, 3.0, 2.0, [150, 90, 60]))),
            msg("c", "telemetry", telemetry(1, "2.0.0", predictions=sums(200, 2.0, 2.0, [20, 30, 150]))),
        ]
    )
    old = store.distribution("m", "1.0.0", 0)
    assert (old.rows, old.devices, old.classes) == (400, 2, [200, 120, 80])
    assert old.mean is not None and math.isclose(old.mean, 2.5)
    assert old.std is not None and math.isclose(old.std, math.sqrt(4 + 0.75))  # within-device spread plus the means' spread
    new = store.distribution("m", "2.0.0", 0)
    assert math.isclose(new.class_shift(old) or 0, 0.5 * (abs(0.1 - 0.5) + abs(0.15 - 0.3) + abs(0.75 - 0.2)))
    assert math.isclose(new.mean_shift(old) or 0, 0.5 / math.sqrt(4.75))
    assert store.distribution("m", "1.0.0", 0, ["a"]).rows == 100 and store.distribution("m", "1.0.0", 0, []).rows == 0
    assert store.distribution("m", "9.9.9", 0).class_shift(old) is None


def shadow_window(compared: int, agreed: int, p95: float) -> dict[str, Any]:
    return {
        "version": "2.0.0",
        "kind": "top1",
        "compared": compared,
        "agreed": agreed,
        "abs_diff_sum": 1.5,
        "values": 30,
        "mismatched": 0,
        "errors": 1,
        "skipped": 0,
        "p95_ms": p95,
    }


def test_shadow_comparisons_add_up(store: FleetStore) -> None:
    store.ingest(
        [
            msg("a", "telemetry", telemetry(1, shadow={**shadow_window(10, 9, 4.0), "active_p95_ms": 2.0})),
            msg("b", "telemetry", telemetry(1, shadow={**shadow_window(30, 15, 6.0), "active_p95_ms": 3.0})),
            msg("c", "telemetry", telemetry(1, shadow={**shadow_window(5, 5, 8.0), "active_p95_ms": 1.0, "version": "3.0.0"})),
        ]
    )
    h = store.shadow_health("m", "2.0.0", 0)
    assert (h.compared, h.agreed, h.errors, h.devices, h.p95_ms, h.active_p95_ms) == (40, 24, 2, 2, 6.0, 3.0)
    assert h.agreement == 0.6 and h.mean_abs_diff == 3.0 / 60
    assert store.shadow_health("m", "2.0.0", 0, ["a"]).agreement == 0.9 and store.shadow_health("m", "2.0.0", 0, []).compared == 0
    assert store.shadow_health("m", "2.0.0", time.time() + 60).compared == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"predictions": {"rows": 5}},  # no sums
        {"predictions": sums(5, 0, 1, classes="many")},  # type: ignore[arg-type]
        {"predictions": {**sums(5, 0, 1), "sum": "lots"}},
        {"predictions": {**sums(5, 0, 1), "sumsq": 1e300}},  # finite, but no device sums to that: it would blind the drift gate
        {"predictions": [1, 2, 3]},
        {"shadow": {"compared": 5}},  # which version?
        {"shadow": {**shadow_window(5, 4, 1.0), "compared": "five"}},
        {"shadow": {**shadow_window(5, 6, 1.0)}},  # agreed more often than compared
        {"shadow": "yes"},
        {"count": -1},
        {"count": 10**15},
        {"errors": {"internal": 10**15}},
        {"p95_ms": -1.0},
    ],
)
def test_a_malformed_message_is_refused_whole(store: FleetStore, bad: dict[str, Any]) -> None:
    store.ingest([msg("a", "telemetry", telemetry(1, predictions=sums(5, 0, 1)))])
    before = counts(store)
    message = telemetry(2)
    model = message["models"][0]
    for key, value in bad.items():
        model[key] = value
    message["models"].append({"model": "other", "version": "1", "count": 3})  # a good model in the same message: not stored either
    with pytest.raises(wire.WireError):
        msg("a", "telemetry", message)
    assert counts(store) == before


def test_a_batch_sent_again_is_stored_once_and_stamped_with_the_receive_time(store: FleetStore) -> None:
    batch = telemetry(7, rows=10)
    batch["ts"] = time.time() + 10 * 365 * 86400  # a device clock ten years ahead decides nothing
    assert store.ingest([msg("a", "telemetry", batch)]) == 1
    assert store.ingest([msg("a", "telemetry", batch)]) == 0  # the acknowledgement was lost: the agent sent it again
    assert store.duplicates == 1 and store.health("m", "1.0.0", 0).requests == 10
    stamped = store.recent_telemetry("a")[0]["ts"]
    assert abs(stamped - time.time()) < 60
    assert store.prune_telemetry(0) == 1  # a receive time ages like any other: retention removes it
    assert store.ingest([msg("a", "telemetry", {**batch, "session": 2})]) == 1  # a new session starts its seq anew


def test_only_server_errors_count_against_a_version(store: FleetStore) -> None:
    message = telemetry(1, rows=90)
    message["models"][0]["errors"] = {"bad_request": 6, "shape_mismatch": 2, "internal": 1, "deadline_exceeded": 1}
    store.ingest([msg("a", "telemetry", message)])
    h = store.health("m", "1.0.0", 0)
    assert (h.requests, h.errors) == (90, 2)
    assert store.telemetry_rows("m", ["a"], 0)[0].client_errors == 8


def test_the_gates_rows_of_a_fleet_larger_than_one_read_come_back_whole_and_share_their_names(store: FleetStore) -> None:
    """The health gate reads every moved and unmoved device's rows (600,000 at 10,000 devices): in parts of
    ``ROWS_PART`` devices, each part turned into rows before the next is read, one string per device id and version.
    Every row comes back, across the parts' edges, with its own values."""
    from fleet.store.telemetry import ROWS_PART

    devices = [f"d-{i:04d}" for i in range(ROWS_PART * 2 + 7)]
    batches = [msg(d, "telemetry", telemetry(seq, rows=10 + i, device=d)) for i, d in enumerate(devices) for seq in (1, 2)]
    batches += [msg(d, "telemetry", {**telemetry(3, "2.0.0", rows=1, device=d), "session": 2}) for d in devices[::100]]
    assert store.ingest(batches) == len(batches)
    asked = [*devices, "never-seen"]
    rows = store.telemetry_rows("m", asked, 0)
    assert len(rows) == len(batches)
    by_device: dict[str, list[Any]] = {}
    for r in rows:
        by_device.setdefault(r.device, []).append(r)
    assert sorted(by_device) == devices
    for i, d in enumerate(devices):
        mine = by_device[d]
        assert sorted(r.requests for r in mine if r.version == "1.0.0") == [10 + i, 10 + i]
        assert len({id(r.device) for r in mine}) == 1  # one string per device id
    assert len({id(r.version) for r in rows if r.version == "1.0.0"}) == 1

    def key(r: Any) -> tuple[float, str, int]:
        return r.ts, r.version, r.requests

    assert sorted(store.telemetry_rows("m", devices[5:6], 0), key=key) == sorted(by_device[devices[5]], key=key)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELDS = st.dictionaries(
    st.sampled_from(["version", "rows", "values", "sum", "sumsq", "classes", "compared", "agreed", "abs_diff_sum", "p95_ms", "output"]),
    JSONISH,
    max_size=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(predictions=st.one_of(st.none(), FIELDS, JSONISH), shadow=st.one_of(st.none(), FIELDS, JSONISH))
def test_any_prediction_or_shadow_fields_are_stored_whole_or_refused_whole(store: FleetStore, predictions: Any, shadow: Any) -> None:
    before = counts(store)
    seq = before[0] + 1
    try:
        message = msg("h", "telemetry", telemetry(seq, predictions=predictions, shadow=shadow))
    except wire.WireError:
        assert counts(store) == before
        return
    assert store.ingest([message]) == 1
    after = counts(store)
    assert after[0] == before[0] + 1
    assert after[1] - before[1] == (predictions is not None) and after[2] - before[2] == (shadow is not None)


def test_fleet_device_shows_the_shadow_and_how_it_compares(store_location: Path | str) -> None:
    fs = FleetStore(store_location)
    shadow_of = {"version": "2.0.0", "variant": "onnx-fp32", "sha256": "ab", "runtime": "onnx"}
    models = {"m": {"version": "1.0.0", "variant": "onnx-fp32", "sha256": "cd", "runtime": "onnx", "device": "CPU", "shadow": shadow_of}}
    shadow = {**shadow_window(80, 60, 4.5), "errors": 2, "skipped": 3, "active_p95_ms": 1.5}
    fs.ingest([msg("cam-1", "reported", reported("cam-1", models)), msg("cam-1", "telemetry", telemetry(1, shadow=shadow))])
    fs.close()
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "device", "cam-1", "--store", str(store_location)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stderr.split())  # rich wraps long lines
    assert "model m 1.0.0 (onnx-fp32 on onnx/CPU) + shadow 2.0.0" in text
    assert "shadow m 2.0.0 (last 10 min): 80 compared, 75.0% agreed, 2 failed, 3 skipped; p95 4.5 ms vs 1.5 ms serving" in text


# -- schema versions, retention, store URLs: the same on both engines where they can be -----------------------


DAY = 86400.0


def aged(message: tuple[str, wire.WireModel, float], days: float) -> tuple[str, wire.WireModel, float]:
    device, decoded, received = message
    return device, decoded, received - days * DAY


def test_retention_removes_old_telemetry_and_on_postgresql_drops_whole_days(store: FleetStore) -> None:
    old, week, now = (
        aged(msg("a", "telemetry", telemetry(seq, predictions=sums(5, 0, 1))), days) for seq, days in ((1, 10), (2, 5), (3, 0))
    )
    assert store.ingest([old, week, now]) == 3
    assert counts(store) == (3, 3, 0)
    assert store.prune_telemetry(7 * DAY) == 1  # what the controller calls every round, with telemetry_retention_days
    assert counts(store) == (2, 2, 0) and store.health("m", "1.0.0", 0).requests == 20
    assert store.prune_telemetry(7 * DAY) == 0
    if store.db.dialect == "postgresql":
        from fleet.store.pg import PostgreSQL

        assert isinstance(store.db, PostgreSQL)
        for table in ("telemetry", "predictions", "shadow"):
            days = [name.rsplit("_p", 1)[1] for name in store.db.partitions(table)]
            assert time.strftime("%Y%m%d", time.gmtime(old[2])) not in days  # dropped, not deleted from
            assert time.strftime("%Y%m%d", time.gmtime(week[2])) in days
            assert time.strftime("%Y%m%d", time.gmtime(now[2] + DAY)) in days  # tomorrow's, made ahead
    assert store.ingest([aged(msg("a", "telemetry", telemetry(4)), 10)]) == 1  # a dropped day is made again when a row needs it


def test_partition_ddl_on_a_busy_table_gives_up_for_now_instead_of_queueing_everyone_behind_it(caplog: pytest.LogCaptureFixture) -> None:
    """CREATE ... PARTITION OF and DROP lock the whole parent table. Queued behind a long read, they held up every
    later write and read of it (the ingest's too) until that read ended. DDL that can wait (tomorrow's partition, an
    old day's drop) now waits a second, says so and is tried again later."""
    import threading

    import psycopg
    from conftest import fresh_postgres

    from fleet.store import pg

    with fresh_postgres() as url:
        fs = FleetStore(url)
        reader = psycopg.connect(url)
        try:
            assert isinstance(fs.db, pg.PostgreSQL)
            day = int(time.time() // DAY)
            assert fs.ingest([aged(msg("a", "telemetry", telemetry(1)), 10)]) == 1  # a day to drop later
            fs.db.ensure_partitions([(day + 20) * DAY])  # day+20 and day+21 made
            names = lambda: fs.db.partitions("telemetry")  # noqa: E731
            future = time.strftime("%Y%m%d", time.gmtime((day + 22) * DAY))
            assert not any(n.endswith(future) for n in names())
            with reader.transaction():
                reader.execute("SELECT count(*) FROM telemetry").fetchone()  # a long read: ACCESS SHARE until it ends
                done = threading.Event()
                worker = threading.Thread(target=lambda: (fs.db.ensure_partitions([(day + 21) * DAY]), done.set()), daemon=True)
                started = time.monotonic()
                worker.start()
                assert done.wait(10), "making tomorrow's partition waited for the long read"
                assert time.monotonic() - started < 5 and not any(n.endswith(future) for n in names())
                assert fs.prune_telemetry(7 * DAY) == 0  # the old day's DROP gives up too, its rows untouched
                assert fs.telemetry_count() == 1
            deferred = [r.getMessage() for r in caplog.records if "store.ddl_deferred" in r.getMessage()]
            assert any("what=create_partition" in m for m in deferred) and any("what=drop_partition" in m for m in deferred)
            fs.db.ensure_partitions([(day + 21) * DAY])
            assert not any(n.endswith(future) for n in names())  # not tried again at once: once a minute
            fs.db._ddl_retry_at = 0.0  # as when the minute has passed
            fs.db.ensure_partitions([(day + 21) * DAY])
            assert any(n.endswith(future) for n in names())
            assert fs.prune_telemetry(7 * DAY) == 1 and fs.telemetry_count() == 0  # the table free: dropped
        finally:
            reader.close()
            fs.close()


def test_a_sqlite_store_made_before_schema_versions_is_upgraded_and_keeps_its_rows(tmp_path: Path) -> None:
    """What the code before versions made (sqlite-utils' tables from the same data, no schema_version) opens."""
    import sqlite3

    import sqlite_utils

    from fleet.store import schema

    path = tmp_path / "fleet.db"
    old = sqlite_utils.Database(sqlite3.connect(str(path)))
    for table in schema.TABLES:
        old.table(table.name).create(table.columns, pk=table.pk, if_not_exists=True)
    for name, (table_name, columns) in schema.INDEXES.items():
        old.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table_name} ({', '.join(columns)})")
    row = {"seq": 1, "ts": time.time(), "model": "m", "version": "1.0.0", "requests": 7, "errors": 0, "p95_ms": 1.0}
    old.table("telemetry").insert({"device": "a", **row, "client_errors": 0, "session": 1, "device_ts": 0.0})
    old.table("rollouts").insert({"spec": "{}", "state": "done", "wave": 0, "reason": "", "created": 1.0, "updated": 1.0, "phase": ""})
    old.conn.close()
    fs = FleetStore(path)
    try:
        assert schema.version(fs.db) == schema.LATEST
        assert fs.health("m", "1.0.0", 0).requests == 7 and [r.id for r in fs.rollouts()] == [1]
        assert fs.create_rollout({}, []) == 2  # the rowid key goes on counting
        assert fs.ingest([msg("a", "telemetry", telemetry(2))]) == 1
    finally:
        fs.close()
    again = FleetStore(path)  # opening an up-to-date store changes nothing
    assert [r["version"] for r in again.db.query("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3, 4, 5, 6]
    again.close()


def test_a_postgresql_store_at_version_1_is_partitioned_by_day_keeping_its_rows() -> None:
    from conftest import fresh_postgres

    from fleet.store import open_database, schema
    from fleet.store.pg import PostgreSQL

    with fresh_postgres() as url:
        v1 = open_database(url)
        assert schema.upgrade(v1, to=1) == 1  # as version 1 made it: one plain table per kind
        now = time.time()
        for day, seq in ((3, 1), (0, 2)):
            row = {"device": "a", "seq": seq, "ts": now - day * DAY, "model": "m", "version": "1.0.0", "requests": 5, "errors": 1}
            v1.insert("telemetry", {**row, "p95_ms": 1.0, "client_errors": 0, "session": 1, "device_ts": 0.0})
        v1.insert("rollouts", {"spec": "{}", "state": "done", "wave": 0, "reason": "", "created": 1.0, "updated": 1.0})
        v1.close()
        fs = FleetStore(url)
        try:
            assert isinstance(fs.db, PostgreSQL) and schema.version(fs.db) == schema.LATEST
            assert len(fs.db.partitions("telemetry")) == 2  # the two days its rows cover
            h = fs.health("m", "1.0.0", 0)
            assert (h.requests, h.errors) == (10, 2)
            assert fs.create_rollout({}, []) == 2
            assert fs.ingest([msg("b", "telemetry", telemetry(1))]) == 1 and fs.telemetry_count() == 3
            assert fs.prune_telemetry(2 * DAY) == 1
        finally:
            fs.close()


@pytest.mark.parametrize(
    "url,error",
    [
        ("mysql://root@127.0.0.1/fleet", "BadStoreURL"),
        ("postgresql://postgres@127.0.0.1:notaport/x", "BadStoreURL"),
        ("postgresql:///no-host", "BadStoreURL"),
        ("postgresql://postgres:secret@127.0.0.1:1/nothing", "StoreUnreachable"),  # nothing listens on port 1
        ("postgresql://postgres@127.0.0.1:5432/edgefleet_test_no_such_database", "StoreUnreachable"),
    ],
)
def test_a_bad_store_url_is_a_typed_error_naming_it_without_its_password(url: str, error: str) -> None:
    from fleet.store import BadStoreURL, StoreUnreachable

    kind = {"BadStoreURL": BadStoreURL, "StoreUnreachable": StoreUnreachable}[error]
    with pytest.raises(kind) as raised:
        FleetStore(url)
    assert "secret" not in str(raised.value) and url.replace(":secret@", ":***@")[:20] in str(raised.value)


def test_the_cli_refuses_a_bad_store_url_as_a_usage_error(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "fleet.cli"]
    done = subprocess.run(
        [*cli, "rollout", "list", "--store", "mysql://root@127.0.0.1/fleet"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2 and "mysql:// is not a store edgefleet opens" in done.stderr
    (tmp_path / "fleet.toml").write_text('store = "postgres://u@127.0.0.1:99999/x"\n')
    done = subprocess.run([*cli, "rollout", "list"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "error[bad_config]: settings: store=" in done.stderr and "Port out of range" in done.stderr
    assert not list(tmp_path.glob("postgres*")), "a URL was never taken for a file name"
    (tmp_path / "fleet.toml").write_text('store = "postgresql://edgefleet:hunter2@db.example.net/fleet"\n')
    done = subprocess.run([*cli, "config", "check"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["store"] == "postgresql://edgefleet:***@db.example.net/fleet"


def test_fleet_serve_ingests_a_devices_telemetry_into_postgresql_partitions(rig: Any, tmp_path: Path) -> None:
    """`fleet serve` with fleet.toml's store a postgresql:// URL, on the real broker: a device's status, reports and
    telemetry land in PostgreSQL, in today's partition."""
    from conftest import fresh_postgres
    from update_rig import MODEL, wait_for

    from fleet.dev.simulate import Simulator, SimulatorThread
    from fleet.store.pg import PostgreSQL

    with fresh_postgres() as url:
        config = tmp_path / "fleet.toml"
        config.write_text(
            f'store = "{url}"\ntelemetry_retention_days = 3\n[broker]\nhost = "{rig.broker.host}"\nport = {rig.broker.port}\n'
        )
        serve = [sys.executable, "-m", "fleet.cli", "serve", str(rig.serve), "--keys", str(rig.keys.directory), "--config", str(config)]
        with open(tmp_path / "serve.log", "wb") as log:
            proc = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=log)
        sims = SimulatorThread(Simulator(rig.broker.host, rig.broker.port, 2, "pgcam", telemetry_s=0.2, initial={MODEL: "1.0.0"})).start()
        reader = FleetStore(url)  # opened beside `fleet serve` (which may be migrating it now: the schema lock)
        try:
            wait_for(lambda: sum(1 for d in reader.devices() if d.id.startswith("pgcam") and d.online and d.models) == 2, 60, "2 devices")
            wait_for(lambda: reader.telemetry_count() >= 4, 60, "telemetry in PostgreSQL")
            assert isinstance(reader.db, PostgreSQL)
            where = reader.db.query("SELECT DISTINCT CAST(CAST(tableoid AS regclass) AS TEXT) AS p FROM telemetry")
            assert [r["p"] for r in where] == [f"telemetry_p{time.strftime('%Y%m%d', time.gmtime())}"]
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        finally:
            sims.stop()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            reader.close()


def _ts(version: int, salt: str = "") -> bytes:
    return json.dumps({"signed": {"_type": "timestamp", "version": version, "salt": salt}}).encode()


def test_director_metadata_is_kept_as_whole_sets_whose_timestamp_never_goes_back(store: FleetStore) -> None:
    """A device's director files are replaced as one set; names left out are deleted; a set older than the store's is
    refused (two writers never publish one version twice); the same set again changes nothing; bytes come back exact."""
    from fleet.store import StaleDirectorMetadata

    root = b'{"signed": {"version": 1}}\n\x00\xff'  # any bytes: served as they were written
    one = {"1.root.json": root, "1.targets.json": b"t1", "1.snapshot.json": b"s1", "timestamp.json": _ts(1)}
    store.put_director_files("dev-1", one, 1)
    assert store.director_files("dev-1") == one and store.director_file("dev-1", "1.root.json") == root
    two = {**one, "2.targets.json": b"t2", "2.snapshot.json": b"s2", "timestamp.json": _ts(2)}
    del two["1.targets.json"]
    store.put_director_files("dev-1", two, 2)
    assert store.director_files("dev-1") == two and store.director_file("dev-1", "1.targets.json") is None
    assert store.director_versions() == {"dev-1": 2}
    store.put_director_files("dev-1", two, 2)  # the same set again (a sync repeating itself)
    with pytest.raises(StaleDirectorMetadata, match="version 2"):
        store.put_director_files("dev-1", {**one, "timestamp.json": _ts(2, "another writer")}, 2)
    with pytest.raises(StaleDirectorMetadata):
        store.put_director_files("dev-1", one, 1)
    assert store.director_files("dev-1") == two  # the refused sets changed nothing
    store.add_director_files("", {"1.root.json": root, "mirrors.json": b"[]"})
    assert store.director_versions() == {"dev-1": 2} and store.director_file("", "mirrors.json") == b"[]"
    assert store.director_file("dev-2", "timestamp.json") is None


def test_a_director_commit_drops_what_it_prunes_keeps_roots_and_refuses_a_name_stored_with_other_bytes(store: FleetStore) -> None:
    """A commit as the store's director signs it: only the new files and the names it prunes (older versions are not
    sent again); a root added beside the set since (a rotation) is never dropped, by a commit or by a whole set pushed
    from files; a set naming a file the store holds with other bytes is refused, not half stored — a second writer whose
    timestamp is byte for byte the store's (same versions, same second) over other targets, or a file set signed from
    another history; the listing and timestamps read back what was committed."""
    from fleet.store import DirectorSet, StaleDirectorMetadata

    one = {"1.root.json": b"r1", "1.targets.json": b"t1", "1.snapshot.json": b"s1", "timestamp.json": _ts(1)}
    store.put_director_sets([DirectorSet("dev-1", one, 1)])
    store.add_director_files("dev-1", {"2.root.json": b"r2"})  # a rotation's new root, beside the set
    new = {"2.targets.json": b"t2", "2.snapshot.json": b"s2", "timestamp.json": _ts(2)}
    store.put_director_sets([DirectorSet("dev-1", new, 2, frozenset({"1.targets.json", "1.root.json"}))])
    kept = {"1.root.json": b"r1", "2.root.json": b"r2", "1.snapshot.json": b"s1", **new}
    assert store.director_files("dev-1") == kept
    assert store.director_listing(["dev-1", "dev-2"]) == {
        "dev-1": {"1.root.json": 1, "2.root.json": 2, "1.snapshot.json": 1, "2.targets.json": 2, "2.snapshot.json": 2, "timestamp.json": 2}
    }
    assert store.director_timestamps(["dev-1", "dev-2"]) == {"dev-1": _ts(2)}
    with pytest.raises(StaleDirectorMetadata):
        store.put_director_sets([DirectorSet("dev-1", {**new, "2.targets.json": b"other"}, 2, frozenset())])
    elsewhere = {"1.root.json": b"r1", "2.targets.json": b"t2-elsewhere", "timestamp.json": _ts(3)}
    with pytest.raises(StaleDirectorMetadata):  # a newer timestamp over a history that differs from the store's
        store.put_director_sets([DirectorSet("dev-1", elsewhere, 3)])
    store.put_director_sets([DirectorSet("dev-1", new, 2, frozenset({"1.targets.json"}))])  # the same commit again
    assert store.director_files("dev-1") == kept
    whole = {"1.root.json": b"r1", "3.targets.json": b"t3", "3.snapshot.json": b"s3", "timestamp.json": _ts(3)}
    store.put_director_sets([DirectorSet("dev-1", whole, 3)])  # pushed from files that lack 2.root.json
    assert store.director_files("dev-1") == {**whole, "2.root.json": b"r2"}


def test_a_store_at_version_2_gains_the_director_and_controller_tables(store_location: Path | str) -> None:
    from fleet.store import open_database, schema

    db = open_database(store_location)
    assert schema.upgrade(db, to=2) == 2
    db.close()
    fs = FleetStore(store_location)
    try:
        assert schema.version(fs.db) == schema.LATEST
        fs.put_director_files("dev-1", {"timestamp.json": _ts(1)}, 1)
        fs.register_controller("c-1", "edgefleet-ingest-c-1", "host")
        assert fs.director_versions() == {"dev-1": 1} and [c["id"] for c in fs.controllers()] == ["c-1"]
    finally:
        fs.close()


def test_a_store_at_version_4_starts_its_model_totals_from_the_telemetry_it_holds(store_location: Path | str) -> None:
    from fleet.store import open_database, schema

    db = open_database(store_location)
    assert schema.upgrade(db, to=4) == 4
    db.ensure_partitions([time.time()])
    for seq, (version, errors) in enumerate((("1.0.0", 1), ("1.0.0", 2), ("2.0.0", 0)), start=1):
        row = {"device": "a", "seq": seq, "ts": time.time(), "model": "m", "version": version, "requests": 5, "errors": errors}
        db.insert("telemetry", {**row, "p95_ms": 1.0, "client_errors": 1, "session": 1, "device_ts": 0.0})
    db.close()
    fs = FleetStore(store_location)
    try:
        assert schema.version(fs.db) == schema.LATEST
        totals = fs.telemetry_totals()
        assert (totals[("m", "1.0.0")].requests, totals[("m", "1.0.0")].server_errors, totals[("m", "1.0.0")].client_errors) == (10, 3, 2)
        assert totals[("m", "2.0.0")].requests == 5
        assert fs.ingest([msg("b", "telemetry", telemetry(1))]) == 1  # then the ingest adds to them
        assert fs.telemetry_totals()[("m", "1.0.0")].requests == 20
    finally:
        fs.close()


def test_an_upgrade_waits_for_no_controller_of_an_earlier_release_and_changes_nothing_while_one_runs(
    store_location: Path | str,
) -> None:
    """A store at version 4 with two registered controllers: "old-1" runs (its id lock is held, as a running `fleet
    serve` of the earlier release holds it), "gone-1" does not. Opening the store with this release refuses the
    upgrade, naming old-1 only, and leaves the store at version 4; once old-1 stops, it upgrades. A store already
    at the latest version opens whatever runs on it (one release's controllers restart one at a time)."""
    from fleet.leader import identity
    from fleet.store import open_database, schema

    db = open_database(store_location)
    assert schema.upgrade(db, to=4) == 4
    for cid in ("gone-1", "old-1"):
        db.insert("controllers", {"id": cid, "client_id": f"edgefleet-ingest-{cid}", "host": "h", "started": time.time()})
    db.close()
    old = identity(store_location, "old-1")
    assert old.try_acquire()
    try:
        with pytest.raises(schema.StoreInUse, match=r"controllers old-1 of an earlier release") as refused:
            FleetStore(store_location)
        assert "gone-1" not in str(refused.value)
        if isinstance(store_location, Path):  # a probe makes no lock file for a controller that never ran here
            assert not Path(f"{store_location}.controller-gone-1").exists()
        db = open_database(store_location)
        assert schema.version(db) == 4
        db.close()
    finally:
        old.release()
    fs = FleetStore(store_location)
    assert schema.version(fs.db) == schema.LATEST
    fs.close()
    again = identity(store_location, "old-1")
    assert again.try_acquire()
    try:
        FleetStore(store_location).close()  # nothing to upgrade: a running controller is no reason to refuse
    finally:
        again.release()


def test_a_replayed_older_report_does_not_write_over_a_newer_one_and_a_live_one_always_counts(store: FleetStore) -> None:
    """A broker replaying a device's older retained ``reported`` after its newer one (a cluster node behind, the
    controller subscribed again on it) leaves the registry on the newer one, counted once the batch is stored; a
    replay of the report held, or of a newer one, is taken; a live report always counts, whatever the device's
    clock says (a Pi rebooted or reflashed with its clock behind), and a replay is then judged against it; once the
    device has started again (a higher status session), its first replayed report is taken, whatever its clock says."""
    now = time.time()

    def report(version: str, ts: float) -> tuple[str, wire.WireModel, float]:
        model = {"version": version, "variant": "onnx-fp32", "sha256": "ab", "runtime": "onnx", "device": "CPU"}
        return msg("a", "reported", {**reported("a", {"m": model}), "ts": ts})

    def version() -> str:
        d = store.device("a")
        assert d is not None
        return str(d.models["m"]["version"])

    store.ingest([report("1.0.0", now - 60), report("2.0.0", now - 10)])
    assert version() == "2.0.0"
    assert store.ingest([report("1.0.0", now - 60)], replayed={0}) == 0 and version() == "2.0.0" and store.stale_reports == 1
    assert store.ingest([report("2.0.0", now - 10), report("2.1.0", now - 5)], replayed={0, 1}) == 2 and version() == "2.1.0"
    store.ingest([report("1.5.0", now - 86400 * 365)])  # live, its clock a year behind: what the device runs now
    assert version() == "1.5.0" and store.stale_reports == 1
    store.ingest([report("1.4.0", now - 86400 * 366)], replayed={0})  # a replay older still
    assert version() == "1.5.0" and store.stale_reports == 2
    store.ingest([report("2.1.0", now - 5)], replayed={0})  # the previous run's, replayed late: taken (its clock says newer)...
    store.ingest([report("1.5.0", now - 86400 * 365 + 60)])  # ... until the device's next live word
    assert version() == "1.5.0" and store.stale_reports == 2
    started_again = msg("a", "status", {"state": "ready", "session": 2, "ts": now})
    store.ingest([started_again, report("1.3.0", now - 86400 * 400)], replayed={1})  # reflashed, only seen replayed
    assert version() == "1.3.0" and store.stale_reports == 2
    store.ingest([report("1.2.0", now - 86400 * 401)], replayed={0})  # an older replay of that run: refused
    assert version() == "1.3.0" and store.stale_reports == 3


def test_a_report_naming_its_run_is_ordered_by_run_then_by_the_devices_clock(store: FleetStore) -> None:
    """Reports that name their agent's run (``session``): a later run's report replayed before that run's status is
    taken, whatever its clock says; an earlier run's replayed after it is refused, whatever its clock says; within
    a run the device's clock decides; a report of a run the record has not heard of yet guards that run against
    replays of its older reports once its status comes; a live report is always taken."""
    now = time.time()

    def report(version: str, ts: float, session: int) -> tuple[str, wire.WireModel, float]:
        model = {"version": version, "variant": "onnx-fp32", "sha256": "ab", "runtime": "onnx", "device": "CPU"}
        return msg("a", "reported", {**reported("a", {"m": model}), "ts": ts, "session": session})

    def version() -> str:
        d = store.device("a")
        assert d is not None
        return str(d.models["m"]["version"])

    def status(session: int) -> tuple[str, wire.WireModel, float]:
        return msg("a", "status", {"state": "ready", "session": session, "ts": now})

    store.ingest([status(5), report("1.0.0", now - 60, 5)])
    assert store.ingest([report("2.0.0", now - 3600, 6)], replayed={0}) == 1 and version() == "2.0.0"  # run 6, clock behind
    assert store.ingest([report("1.0.0", now + 3600, 5)], replayed={0}) == 0 and version() == "2.0.0"  # run 5, clock ahead
    assert store.stale_reports == 1
    assert store.ingest([report("1.9.0", now - 7200, 6)], replayed={0}) == 0 and store.stale_reports == 2  # older, same run
    assert store.ingest([report("2.1.0", now - 1800, 6)], replayed={0}) == 1 and version() == "2.1.0"  # newer, same run
    store.ingest([report("3.0.0", now - 30, 7)])  # live, of run 7, before run 7's status reached the record
    store.ingest([status(7)])
    assert store.ingest([report("2.9.0", now - 40, 7)], replayed={0}) == 0 and version() == "3.0.0" and store.stale_reports == 3
    store.ingest([report("0.9.0", now - 86400, 4)])  # live: what the device says now, whichever run it names
    assert version() == "0.9.0" and store.stale_reports == 3


def test_an_earlier_agents_report_replayed_after_its_upgrade_is_refused(store: FleetStore) -> None:
    """Run 5 of an earlier agent reported without naming its run; the upgraded agent's run 6 reports (naming it)
    before run 6's status reaches the record; the earlier agent's report, replayed then by a node behind, is older by
    the device's clock and is not taken — nor is a run-5 report naming its run."""
    now = time.time()
    model = {"variant": "onnx-fp32", "sha256": "ab", "runtime": "onnx", "device": "CPU"}

    def report(version: str, ts: float, **session: int) -> tuple[str, wire.WireModel, float]:
        return msg("a", "reported", {**reported("a", {"m": {**model, "version": version}}), "ts": ts, **session})

    store.ingest([msg("a", "status", {"state": "ready", "session": 5, "ts": now}), report("1.0.0", now - 60)])
    store.ingest([report("2.0.0", now - 10, session=6)])
    assert store.ingest([report("1.0.0", now - 60)], replayed={0}) == 0 and store.stale_reports == 1
    assert store.ingest([report("1.0.0", now - 60, session=5)], replayed={0}) == 0 and store.stale_reports == 2
    d = store.device("a")
    assert d is not None and d.models["m"]["version"] == "2.0.0"


def test_the_ingest_marks_retained_and_resent_reports_as_replays(tmp_path: Path) -> None:
    """What the broker hands the ingest tells it apart: a message retained at a subscription (retain flag) or a QoS 1
    message sent again after a reconnect (dup flag) is a replay, judged against the report held; a live one is not.
    (The ingest is not connected here: its acknowledgements fail, logged, and the store is the point.)"""
    import paho.mqtt.client as mqtt

    from fleet.transport.ingest import Ingestor

    fs = FleetStore(tmp_path / "fleet.db")
    ingest = Ingestor(fs, "127.0.0.1", 1)
    now = time.time()

    def deliver(version: str, ts: float, retain: bool = False, dup: bool = False) -> None:
        model = {"version": version, "variant": "onnx-fp32", "sha256": "ab", "runtime": "onnx", "device": "CPU"}
        m = mqtt.MQTTMessage(mid=1, topic=wire.device_topic("a", "reported").encode())
        m.payload, m.qos, m.retain, m.dup = json.dumps({**reported("a", {"m": model}), "ts": ts}).encode(), 1, retain, dup
        ingest._on_message(ingest._client, None, m)
        ingest.flush()

    try:
        deliver("2.0.0", now)
        deliver("1.0.0", now - 60, retain=True)
        deliver("1.0.0", now - 60, dup=True)
        assert fs.stale_reports == 2 and (d := fs.device("a")) is not None and d.models["m"]["version"] == "2.0.0"
        deliver("1.0.0", now - 60)  # live: what the device says now
        assert fs.stale_reports == 2 and (d := fs.device("a")) is not None and d.models["m"]["version"] == "1.0.0"
    finally:
        fs.close()


def test_a_store_at_version_5_gains_the_order_of_reports_and_keeps_its_devices(store_location: Path | str) -> None:
    """A registry written before version 6 (no report times): its devices keep their records, and the next report of
    each is taken, a replay too, whatever its time."""
    from fleet.store import open_database, schema

    db = open_database(store_location)
    assert schema.upgrade(db, to=5) == 5
    for column in schema.REPORT_ORDER.columns:  # version 1 made the table as this release has it: as 5 had it
        db.execute(f'ALTER TABLE devices DROP COLUMN "{column}"')
    db.execute(
        'INSERT INTO devices (id, online, session, last_seen, hardware, runtimes, models, tags, "update", preferred_variants)'
        """ VALUES ('a', 1, 3, 1.0, 'x86_64', '{}', '{"m": {"version": "1.0.0"}}', '{"site": "x"}', '{}', '[]')"""
    )
    db.close()
    fs = FleetStore(store_location)
    try:
        assert schema.version(fs.db) == schema.LATEST
        d = fs.device("a")
        assert d is not None and d.models["m"]["version"] == "1.0.0" and d.tags == {"site": "x"} and d.reported_ts == 0.0
        model = {"version": "2.0.0", "variant": "onnx-fp32", "sha256": "ab", "runtime": "onnx", "device": "CPU"}
        assert fs.ingest([msg("a", "reported", {**reported("a", {"m": model}), "ts": 1.0})], replayed={0}) == 1
        d = fs.device("a")
        assert d is not None and d.models["m"]["version"] == "2.0.0" and (d.reported_ts, d.reported_session) == (1.0, 3)
    finally:
        fs.close()


def test_a_job_never_moves_back_when_its_updates_arrive_out_of_order(store: FleetStore) -> None:
    """A dead controller's ingest session, drained by the leader that adopted it, can hand over DOWNLOADING after
    another controller stored ACTIVE: the store keeps the furthest state; a rollback after ACTIVE still lands."""

    def update(state: str, status: str = "IN_PROGRESS") -> wire.WireModel:
        body = {
            "id": "j1",
            "target_path": "m/1.1.0/onnx-fp32.tar",
            "model": "m",
            "version": "1.1.0",
            "variant": "onnx-fp32",
            "release_counter": 2,
            "length": 10,
            "sha256": "ab",
            "state": state,
            "status": status,
            "offset": 0,
            "reason": "",
            "attempts": 1,
            "created": 1.0,
            "updated": 2.0,
            "shadow": 0,
        }
        topic = wire.parse_device_topic(wire.device_topic("a", "jobs", "j1"))
        return wire.decode_device_message(topic, json.dumps(body).encode())

    now = time.time()
    store.ingest([("a", update("DOWNLOADING"), now), ("a", update("ACTIVE", "SUCCEEDED"), now + 1)])
    store.ingest([("a", update("VERIFYING"), now + 2), ("a", update("DOWNLOADING"), now + 3)])  # late, older words
    assert [(j.job, j.state) for j in store.jobs("a")] == [("j1", "ACTIVE")]
    store.ingest([("a", update("ROLLED_BACK", "ROLLED_BACK"), now + 4)])
    assert [j.state for j in store.jobs("a")] == ["ROLLED_BACK"]
    store.ingest([("a", update("ACTIVE", "SUCCEEDED"), now + 5)])  # the rollback is the job's last word
    assert [j.state for j in store.jobs("a")] == ["ROLLED_BACK"]


def test_a_job_end_sent_again_keeps_the_time_it_ended(store: FleetStore) -> None:
    """An end received again (a QoS 1 message sent again, a dead controller's session drained by the leader) does not
    re-date the job: a rollout that assigned the device after that end must not take it for the device's word on
    the new assignment. Progress of a job under way still moves its time (a long download keeps speaking)."""
    path = "m/1.1.0/onnx-fp32.tar"

    def update(job: str, state: str, offset: int = 0) -> wire.WireModel:
        status = {"ACTIVE": "SUCCEEDED", "REJECTED": "REJECTED"}.get(state, "IN_PROGRESS")
        body = {
            "id": job, "target_path": path, "model": "m", "version": "1.1.0", "variant": "onnx-fp32", "release_counter": 2,
            "length": 10, "sha256": "ab", "state": state, "status": status, "offset": offset, "reason": "", "attempts": 1,
            "created": 1.0, "updated": 2.0, "shadow": 0,
        }  # fmt: skip
        topic = wire.parse_device_topic(wire.device_topic("a", "jobs", job))
        return wire.decode_device_message(topic, json.dumps(body).encode())

    store.ingest([("a", update("j1", "ACTIVE"), 100.0), ("a", update("j2", "DOWNLOADING"), 201.0)])
    store.ingest([("a", update("j1", "ACTIVE"), 210.0), ("a", update("j2", "DOWNLOADING", 5), 215.0)])
    assert {j.job: (j.state, j.ts) for j in store.jobs("a")} == {"j1": ("ACTIVE", 100.0), "j2": ("DOWNLOADING", 215.0)}
    assert store.last_jobs({"a": path})["a"].job == "j2"
    store.ingest([("a", update("j2", "REJECTED"), 220.0), ("a", update("j2", "REJECTED"), 230.0)])
    assert {j.job: (j.state, j.ts) for j in store.jobs("a")}["j2"] == ("REJECTED", 220.0)


def test_on_postgresql_a_director_read_does_not_wait_behind_a_blocked_ingest() -> None:
    """The repository servers read director files while the same controller's ingest writes telemetry. On PostgreSQL
    each thread has its own pooled connection, so a flush stuck on the database (here: the telemetry table locked by
    another session) must not hold up the read; the flush then finishes once the lock goes."""
    import threading

    import psycopg
    from conftest import fresh_postgres
    from update_rig import wait_for

    with fresh_postgres() as url:
        store = FleetStore(url)
        try:
            store.put_director_files("dev-1", {"timestamp.json": _ts(1)}, 1)
            store.ingest([msg("dev-1", "telemetry", telemetry(1))])  # today's partitions made: the flush below only inserts
            stored: list[int] = []
            with psycopg.connect(url, autocommit=True) as other, other.transaction():
                other.execute("LOCK TABLE batches IN ACCESS EXCLUSIVE MODE")
                flush = threading.Thread(target=lambda: stored.append(store.ingest([msg("dev-1", "telemetry", telemetry(2))])))
                flush.start()
                wait_for(lambda: other.execute("SELECT 1 FROM pg_locks WHERE NOT granted").fetchall(), 10, "the ingest at the locked table")
                read: list[bytes | None] = []
                reader = threading.Thread(target=lambda: read.append(store.director_file("dev-1", "timestamp.json")))
                reader.start()
                reader.join(2.0)
                assert read == [_ts(1)] and flush.is_alive() and not stored  # read while the flush waits
            flush.join(10)
            reader.join(10)
            assert stored == [1]
        finally:
            store.close()


def test_on_postgresql_a_replay_waits_for_the_newer_report_another_controller_is_writing() -> None:
    """Two controllers on one PostgreSQL database each store every device's retained reports. One is writing a
    device's newer report (its transaction open, holding the device's lock as every ingest does); the other is handed
    an older one replayed (it subscribed again, on a cluster node behind). The replay's read must wait for that write
    and then refuse the replay: read before the commit, it passed the check, and its whole-row write landed after the
    newer report, leaving the registry on the older version until the device's next report (which a device that is
    done never sends). And a device not stored yet is locked the same way (no row to lock: the lock is by its id)."""
    import threading

    import psycopg
    from conftest import fresh_postgres
    from update_rig import wait_for

    from fleet.store.devices import DEVICE_LOCKS, device_lock_key

    now = time.time()

    def model(version: str) -> dict[str, Any]:
        return {"m": {"version": version, "variant": "onnx-fp32", "sha256": "ab", "runtime": "onnx", "device": "CPU"}}

    def report(device: str, version: str, ts: float) -> tuple[str, wire.WireModel, float]:
        return msg(device, "reported", {**reported(device, model(version)), "ts": ts})

    with fresh_postgres() as url:
        store = FleetStore(url)
        try:
            store.ingest([msg("a", "status", {"state": "ready", "session": 1, "ts": now - 100}), report("a", "1.0.0", now - 60)])
            done: list[int] = []
            with psycopg.connect(url, autocommit=True) as other:
                waiting = "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'advisory'"
                with other.transaction():  # the other controller's ingest, its write made, not committed yet
                    other.execute("SELECT pg_advisory_xact_lock(%s, %s)", [DEVICE_LOCKS, device_lock_key("a")])
                    other.execute("UPDATE devices SET reported_ts = %s, models = %s WHERE id = 'a'", [now - 10, json.dumps(model("2.0.0"))])
                    replay = threading.Thread(target=lambda: done.append(store.ingest([report("a", "1.5.0", now - 30)], replayed={0})))
                    replay.start()
                    wait_for(lambda: other.execute(waiting).fetchall(), 10, "the replay waiting for the other controller")
                replay.join(10)
                d = store.device("a")
                assert d is not None and d.models["m"]["version"] == "2.0.0"
                assert done == [0] and store.stale_reports == 1

                with other.transaction():  # a device no controller has stored yet: the second to store it waits too
                    other.execute("SELECT pg_advisory_xact_lock(%s, %s)", [DEVICE_LOCKS, device_lock_key("new")])
                    hello = msg("new", "status", {"state": "ready", "session": 1, "ts": now})
                    first = threading.Thread(target=lambda: store.ingest([hello]))
                    first.start()
                    wait_for(lambda: other.execute(waiting).fetchall(), 10, "the new device's first write waiting")
                first.join(10)
                assert not first.is_alive() and store.device("new") is not None
        finally:
            store.close()


def test_a_device_record_written_from_an_older_read_keeps_the_tags_set_since(store: FleetStore, store_location: Path | str) -> None:
    """The ingest reads a device's record, applies what the device said and writes it back; an operator's ``fleet tag``
    (another process, another store object) may commit in between. The ingest's write must keep that tag, and a tag
    must keep what the ingest wrote."""
    store.ingest([msg("a", "status", {"state": "ready", "session": 1, "ts": time.time()})])
    stale = store.device("a")
    assert stale is not None and stale.tags == {}
    operator = FleetStore(store_location)
    try:
        assert operator.tag("a", {"site": "berlin", "rack": "3"}).tags == {"site": "berlin", "rack": "3"}
        stale.online, stale.session = False, 2
        store._devices.write(stale)  # the flush's write of its older copy (the interleaving, made explicit)
        now = store.device("a")
        assert now is not None and now.tags == {"site": "berlin", "rack": "3"} and (now.online, now.session) == (False, 2)
        assert operator.tag("a", {"rack": ""}).tags == {"site": "berlin"}  # an empty value removes the key
        again = store.device("a")
        assert again is not None and (again.online, again.session) == (False, 2)
        assert operator.tag("new", {"site": "x"}).tags == {"site": "x"}  # a device not seen yet gets a record
    finally:
        operator.close()


def test_a_sqlite_store_that_cannot_be_opened_is_a_typed_error(tmp_path: Path) -> None:
    """A directory, a 100,000-character path, a file under a file: ``StoreUnreachable`` naming the store (the command
    line prints it as ``error[store_unreachable]``), never sqlite3's or the OS's own traceback."""
    from fleet.store import StoreUnreachable

    (tmp_path / "plain").write_text("not a directory")
    for bad in (tmp_path, tmp_path / ("a" * 100_000), tmp_path / "plain" / "fleet.db"):
        with pytest.raises(StoreUnreachable, match="SQLite store"):
            FleetStore(bad)


def test_telemetry_of_a_run_the_registry_never_saw_start_puts_the_device_online_on_it(store: FleetStore) -> None:
    """A device's ``ready`` that never reached the registry (a nats-server cluster lost one at the first connection of
    100 devices) left it offline with its models for good, and a rollout never assigned it. Telemetry of a run newer
    than the record's puts the device online on that run, counted; telemetry of the record's own run after its will
    (sent before the drop, delivered late) or of an earlier run changes nothing."""
    now = time.time()

    def status(state: str, session: int) -> tuple[str, wire.WireModel, float]:
        return msg("a", "status", {"state": state, "session": session, "ts": now})

    def batch(session: int, seq: int) -> tuple[str, wire.WireModel, float]:
        return msg("a", "telemetry", {**telemetry(seq), "session": session})

    def online() -> tuple[bool, int]:
        d = store.device("a")
        assert d is not None
        return d.online, d.session

    store.ingest([msg("a", "reported", reported("a", {}))])  # its report came, its ``ready`` never did
    assert online() == (False, 0)
    store.ingest([batch(7, 1)])
    assert online() == (True, 7) and store.newer_runs == 1
    store.ingest([status("lost", 7)])  # that run's will
    store.ingest([batch(7, 2)])  # a batch of that run delivered after its will: not a sign of life
    assert online() == (False, 7) and store.newer_runs == 1
    store.ingest([batch(6, 1)])  # an earlier run's batch, re-sent from the outbox by a later run
    assert online() == (False, 7) and store.newer_runs == 1
    store.ingest([status("ready", 8), batch(8, 1)])  # the usual order: its status first, then the batch changes nothing
    assert online() == (True, 8) and store.newer_runs == 1
    store.ingest([batch(9, 1), status("lost", 9)])  # a batch and the run's will in one flush: the will is the last word
    assert online() == (False, 9) and store.newer_runs == 1
    assert store.duplicates == 0 and store.rejected == 0  # every batch was stored as telemetry all the same


def test_a_controller_whose_run_hint_is_behind_reads_the_record_before_it_decides(store_location: Path | str) -> None:
    """Two controllers on one store: the one that last saw run 7 gets a batch of run 8 after the other stored run 8's
    ``ready`` and then its will. Its hint is only a lower bound: it reads the record, and the device stays offline."""
    now = time.time()
    first, second = FleetStore(store_location), FleetStore(store_location)
    try:

        def batch(session: int, seq: int) -> tuple[str, wire.WireModel, float]:
            return msg("a", "telemetry", {**telemetry(seq), "session": session})

        first.ingest([msg("a", "status", {"state": "ready", "session": 7, "ts": now}), batch(7, 1)])
        second.ingest([msg("a", "status", {"state": "ready", "session": 8, "ts": now})])
        second.ingest([msg("a", "status", {"state": "lost", "session": 8, "ts": now})])
        first.ingest([batch(8, 1)])  # sent before run 8's will, delivered to the first controller after it
        d = first.device("a")
        assert d is not None and (d.online, d.session) == (False, 8) and first.newer_runs == 0
        first.ingest([batch(9, 1)])  # a run neither saw start: online on it
        d = second.device("a")
        assert d is not None and (d.online, d.session) == (True, 9) and first.newer_runs == 1
    finally:
        first.close()
        second.close()
