"""``/metrics``'s fleet aggregates from the store, on real SQLite and real PostgreSQL, read back with prometheus_client's
own parser; and the Prometheus naming conventions every family keeps."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_fleet_store import msg, reported, telemetry

from fleet.metrics import FleetMetrics
from fleet.store import FleetStore, PlannedDevice
from fleet.store.rollouts import DeviceChange


@pytest.fixture
def store(store_location: Path | str) -> Iterator[FleetStore]:
    fs = FleetStore(store_location)
    yield fs
    fs.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def back(seconds: float, item: tuple[str, object, float]) -> tuple[str, object, float]:
    """A message as if received ``seconds`` ago (stored late, or old enough for retention)."""
    device, message, received = item
    return device, message, received - seconds


def status(device: str, state: str) -> tuple[str, object, float]:
    return msg(device, "status", {"state": state, "session": 1, "ts": time.time()})


def test_fleet_aggregates_devices_versions_rollouts_gates(store: FleetStore) -> None:
    store.ingest([status("a", "ready"), status("b", "ready"), status("c", "lost")])
    store.ingest([msg(d, "reported", reported(d, {}, hw)) for d, hw in (("a", "x86_64"), ("b", "x86_64"), ("c", "pi"))])
    batches = []
    for seq, (device, p95) in enumerate((("a", 2.0), ("b", 4.0), ("c", 30.0)), start=1):
        t = telemetry(seq, device=device)
        t["models"][0].update(p95_ms=p95, errors={"internal": 2, "bad_request": 1})
        batches.append(back(60, msg(device, "telemetry", t)))
    batches.append(back(60, msg("a", "telemetry", telemetry(9, "1.1.0", device="a"))))
    store.ingest(batches)
    metrics = FleetMetrics(store)
    got = samples(metrics.render().decode())
    assert got[("edgefleet_devices", (("hardware", "x86_64"), ("state", "online")))] == 2
    assert got[("edgefleet_devices", (("hardware", "pi"), ("state", "offline")))] == 1
    v1 = (("model", "m"), ("version", "1.0.0"))
    assert got[("edgefleet_model_requests_total", v1)] == 30
    assert got[("edgefleet_model_server_errors_total", v1)] == 6  # internal counts against the version
    assert got[("edgefleet_model_client_errors_total", v1)] == 3  # bad_request is the caller's
    assert got[("edgefleet_model_requests_total", (("model", "m"), ("version", "1.1.0")))] == 10
    assert got[("edgefleet_model_latency_p95_seconds", v1)] == pytest.approx(0.004)  # the median device, not the slow one

    # counters: a second scrape counts nothing twice; a batch stored late (received a minute ago) still counts, a
    # batch sent again does not, and retention never takes from them
    assert samples(metrics.render().decode())[("edgefleet_model_requests_total", v1)] == 30
    store.ingest([back(60, msg("b", "telemetry", telemetry(10, device="b")))])
    store.ingest([msg("b", "telemetry", telemetry(11, device="b"))])
    store.ingest([msg("b", "telemetry", telemetry(11, device="b"))])  # the same batch again: a duplicate
    assert samples(metrics.render().decode())[("edgefleet_model_requests_total", v1)] == 50
    store.prune_telemetry(1.0)  # SQLite: the rows a minute old go (PostgreSQL drops whole days only)
    assert samples(metrics.render().decode())[("edgefleet_model_requests_total", v1)] == 50
    assert samples(FleetMetrics(store).render().decode())[("edgefleet_model_requests_total", v1)] == 50  # a restarted controller

    plan = [[PlannedDevice("a", "1.0.0", "onnx-fp32", "x86_64")], [PlannedDevice("b", "1.0.0", "onnx-fp32", "x86_64")]]
    done = store.create_rollout({"model": "m", "version": "1.1.0"}, plan)
    store.update_rollout(done, state="done", wave=1, reason="every wave done")
    aborted = store.create_rollout({"model": "m", "version": "1.2.0", "shadow": True}, plan, phase="shadow")
    store.update_rollout(aborted, state="aborted", reason="shadow gate: 1.2.0 agreed with the serving version on 10.0%")
    running = store.create_rollout({"model": "m", "version": "1.3.0"}, plan)
    store.update_rollout(running, wave=1)
    store.set_device_states(running, [DeviceChange("a", "active", "", time.time())])
    installs = store.create_rollout({"model": "m", "version": "1.4.0"}, plan)
    store.update_rollout(installs, state="aborted", reason="install gate: 1 of 1 devices in wave 1 failed to install")
    got = samples(metrics.render().decode())
    assert got[("edgefleet_rollouts", (("state", "done"),))] == 1
    assert got[("edgefleet_rollouts", (("state", "aborted"),))] == 2
    assert got[("edgefleet_rollouts", (("state", "running"),))] == 1
    assert got[("edgefleet_rollout_waves", (("state", "done"),))] == 3  # both of the done one, the first of the running one
    assert got[("edgefleet_rollout_waves", (("state", "current"),))] == 1
    assert got[("edgefleet_rollout_waves", (("state", "aborted"),))] == 2
    assert got[("edgefleet_rollout_waves", (("state", "cancelled"),))] == 2
    assert got[("edgefleet_rollout_devices", (("state", "active"),))] == 1  # only rollouts not ended
    assert got[("edgefleet_rollout_devices", (("state", "pending"),))] == 1
    assert got[("edgefleet_gate_decisions_total", (("decision", "go"), ("gate", "health")))] == 3
    assert got[("edgefleet_gate_decisions_total", (("decision", "abort"), ("gate", "shadow")))] == 1
    assert got[("edgefleet_gate_decisions_total", (("decision", "abort"), ("gate", "install")))] == 1
    assert ("edgefleet_gate_decisions_total", (("decision", "go"), ("gate", "shadow"))) not in got


def test_a_version_whose_telemetry_retention_removed_leaves_the_counters(store: FleetStore) -> None:
    """The totals outlive retention while a version still has telemetry; once its last row is gone its series goes
    too, so a device naming ever-new versions cannot grow ``/metrics`` (and the store) for good."""
    day = 86400.0
    store.ingest([back(3 * day, msg("a", "telemetry", telemetry(1, "0.9.0", device="a")))])
    store.ingest([back(3 * day, msg("a", "telemetry", telemetry(2, device="a")))])
    store.ingest([msg("a", "telemetry", telemetry(3, device="a"))])
    assert set(store.telemetry_totals()) == {("m", "0.9.0"), ("m", "1.0.0")}
    assert store.prune_telemetry(day) == 2
    totals = store.telemetry_totals()
    assert set(totals) == {("m", "1.0.0")} and totals[("m", "1.0.0")].requests == 20  # its old batch still counted
    got = samples(FleetMetrics(store).render().decode())
    assert ("edgefleet_model_requests_total", (("model", "m"), ("version", "0.9.0"))) not in got


def test_every_family_is_named_by_the_conventions(store: FleetStore) -> None:
    """edgefleet_ prefix; counters end in _total; a unit is a base unit (seconds), spelled as the suffix."""
    text = FleetMetrics(store).render().decode()
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        assert family.name.startswith("edgefleet_"), family.name
        assert not any(unit in family.name for unit in ("_ms", "_milliseconds", "_percent")), family.name
        for s in family.samples:
            assert family.type != "counter" or s.name.endswith("_total"), s.name
