"""The controller's store on real SQLite: prediction sums and shadow comparisons in, aggregates out, bad input refused whole."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.store import FleetStore


@pytest.fixture
def store(tmp_path: Path) -> FleetStore:
    return FleetStore(tmp_path / "fleet.db")


def telemetry(seq: int, version: str = "1.0.0", predictions: Any = None, shadow: Any = None, rows: int = 10) -> dict[str, Any]:
    model: dict[str, Any] = {"version": version, "count": rows, "errors": 0, "p95_ms": 2.0}
    if predictions is not None:
        model["predictions"] = predictions
    if shadow is not None:
        model["shadow"] = shadow
    return {"seq": seq, "ts": time.time(), "models": {"m": model}, "errors": {}}


def sums(rows: int, mean: float, std: float, classes: list[int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"output": "y", "rows": rows, "values": rows, "sum": rows * mean, "sumsq": rows * (std**2 + mean**2)}
    if classes is not None:
        out["classes"] = classes
    return out


def counts(store: FleetStore) -> tuple[int, int, int]:
    return tuple(int(store.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in ("telemetry", "predictions", "shadow"))  # type: ignore[return-value]


def test_prediction_sums_add_up_across_devices_into_a_distribution(store: FleetStore) -> None:
    store.ingest(
        [
            ("a", "telemetry", telemetry(1, predictions=sums(100, 1.0, 2.0, [50, 30, 20]))),
            ("b", "telemetry", telemetry(1, predictions=sums(300, 3.0, 2.0, [150, 90, 60]))),
            ("c", "telemetry", telemetry(1, "2.0.0", predictions=sums(200, 2.0, 2.0, [20, 30, 150]))),
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


def test_shadow_comparisons_add_up(store: FleetStore) -> None:
    def window(compared: int, agreed: int, p95: float) -> dict[str, Any]:
        return {"version": "2.0.0", "compared": compared, "agreed": agreed, "abs_diff_sum": 1.5, "values": 30, "errors": 1, "p95_ms": p95}

    store.ingest(
        [
            ("a", "telemetry", telemetry(1, shadow={**window(10, 9, 4.0), "active_p95_ms": 2.0})),
            ("b", "telemetry", telemetry(1, shadow={**window(30, 15, 6.0), "active_p95_ms": 3.0})),
            ("c", "telemetry", telemetry(1, shadow={**window(5, 5, 8.0), "active_p95_ms": 1.0, "version": "3.0.0"})),
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
        {"predictions": [1, 2, 3]},
        {"shadow": {"compared": 5}},  # which version?
        {"shadow": {"version": "2", "compared": "five"}},
        {"shadow": "yes"},
    ],
)
def test_a_malformed_message_is_refused_whole(store: FleetStore, bad: dict[str, Any]) -> None:
    store.ingest([("a", "telemetry", telemetry(1, predictions=sums(5, 0, 1)))])
    before = counts(store)
    message = telemetry(2, **bad)
    message["models"]["other"] = {"version": "1", "count": 3}  # a good model in the same message: not stored either
    assert store.ingest([("a", "telemetry", message), ("a", "status", {"state": "ready", "session": 1})]) == 1
    assert counts(store) == before and store.rejected == 1 and "a telemetry" in store.last_rejection
    assert store.device("a") is not None  # the rest of the batch went in


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
    before, rejected = counts(store), store.rejected
    stored = store.ingest([("h", "telemetry", telemetry(1, predictions=predictions, shadow=shadow))])
    after = counts(store)
    if stored:
        assert after[0] == before[0] + 1 and store.rejected == rejected
        assert after[1] - before[1] == (predictions is not None) and after[2] - before[2] == (shadow is not None)
    else:
        assert after == before and store.rejected == rejected + 1


def test_fleet_device_shows_the_shadow_and_how_it_compares(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    fs = FleetStore(db)
    reported = {
        "hardware": "x86_64",
        "models": {"m": {"version": "1.0.0", "variant": "onnx-fp32", "runtime": "onnx", "device": "CPU", "shadow": {"version": "2.0.0"}}},
    }
    shadow = {"version": "2.0.0", "compared": 80, "agreed": 60, "errors": 2, "skipped": 3, "p95_ms": 4.5, "active_p95_ms": 1.5}
    fs.ingest([("cam-1", "reported", reported), ("cam-1", "telemetry", telemetry(1, shadow=shadow))])
    fs.close()
    done = subprocess.run([sys.executable, "-m", "fleet.cli", "device", "cam-1", "--store", str(db)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stderr.split())  # rich wraps long lines
    assert "model m 1.0.0 (onnx-fp32 on onnx/CPU) + shadow 2.0.0" in text
    assert "shadow m 2.0.0 (last 10 min): 80 compared, 75.0% agreed, 2 failed, 3 skipped; p95 4.5 ms vs 1.5 ms serving" in text
