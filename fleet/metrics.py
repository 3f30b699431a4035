"""``/metrics`` on ``fleet serve --http``: the fleet's aggregates from the store, and this process's own counters.

Why read at scrape time (a custom collector) and not kept in gauges: the store is the truth every controller shares —
any of several controllers answers the same numbers, a restarted one too, and nothing is kept twice. Each scrape runs
a few GROUP BY queries (``fleet.store.aggregates``) and reads the ingest's and repository server's counters.

The calls, errors and p95 per model version come from the devices' telemetry. The counters are the store's
``model_totals``, which the ingest adds each batch to in the transaction that stores it: every controller reads the
same totals, a batch written late (the store was away) is counted once it is written, and a restart does not make
them go down (retention removes a version's series only with its last telemetry row). They were once the telemetry
received since the previous scrape, read a few seconds behind now: a batch written later than that was never counted.

Optional: ``prometheus_client`` comes with ``edgefleet[controller]``; without it ``/metrics`` answers 503 and says so.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fleet.store import FleetStore

if TYPE_CHECKING:
    from fleet.controller import Controller

__all__ = ["CONTENT_TYPE", "FleetMetrics", "P95_WINDOW_S"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
P95_WINDOW_S = 300.0  # the p95 gauge: each device's mean batch p95 over this window, then the median over devices
MESSAGE_KINDS = ("status", "reported", "telemetry", "jobs")


class FleetMetrics:
    """A Prometheus collector over ``store`` (and ``controller``'s ingest and repository server when given)."""

    def __init__(self, store: FleetStore, controller: Controller | None = None) -> None:
        self.store, self.controller = store, controller

    def render(self) -> bytes:
        """The text exposition format of everything below (``prometheus_client`` imported here: ImportError without it)."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return bytes(generate_latest(registry))

    def collect(self) -> Iterator[Any]:
        yield from self._devices_and_versions()
        yield from self._process()

    def _counted(self) -> dict[str, dict[tuple[str, str], int]]:
        totals = self.store.telemetry_totals()
        return {
            "requests": {key: t.requests for key, t in totals.items()},
            "server_errors": {key: t.server_errors for key, t in totals.items()},
            "client_errors": {key: t.client_errors for key, t in totals.items()},
        }

    def _devices_and_versions(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        agg = self.store.fleet_aggregates(time.time() - P95_WINDOW_S)
        devices = GaugeMetricFamily("edgefleet_devices", "Registered devices by online state and hardware", labels=["state", "hardware"])
        for (online, hardware), n in sorted(agg.devices.items()):
            devices.add_metric(["online" if online else "offline", hardware], n)
        yield devices
        helps = {
            "requests": "Inference calls devices answered, per model version (from their telemetry)",
            "server_errors": "Server-side errors (internal, overloaded, deadline, runtime), per model version",
            "client_errors": "Callers' errors (bad_request, shape_mismatch, unknown_model), per model version",
        }
        for key, counts in self._counted().items():
            family = CounterMetricFamily(f"edgefleet_model_{key}", helps[key], labels=["model", "version"])
            for (model, version), n in sorted(counts.items()):
                family.add_metric([model, version], n)
            yield family
        p95 = GaugeMetricFamily(
            "edgefleet_model_latency_p95_seconds",
            f"Median over devices of each device's p95 latency in the last {P95_WINDOW_S:.0f} s, per model version",
            labels=["model", "version"],
        )
        for (model, version), ms in sorted(agg.p95_ms.items()):
            p95.add_metric([model, version], ms / 1e3)
        yield p95
        yield _labelled(GaugeMetricFamily, "edgefleet_rollouts", "Rollouts by state", "state", agg.rollouts)
        yield _labelled(GaugeMetricFamily, "edgefleet_rollout_waves", "Waves of every rollout by state", "state", agg.waves)
        yield _labelled(
            GaugeMetricFamily, "edgefleet_rollout_devices", "Devices of rollouts not ended, by state", "state", agg.rollout_devices
        )
        gates = CounterMetricFamily(
            "edgefleet_gate_decisions", "Gate decisions of every rollout: go or abort, per gate", labels=["gate", "decision"]
        )
        for (gate, decision), n in sorted(agg.gates.items()):
            gates.add_metric([gate, decision], n)
        yield gates

    def _process(self) -> Iterator[Any]:
        """This controller's own counters: ingest, store, repository server (since this process started)."""
        from prometheus_client.core import CounterMetricFamily

        c = self.controller
        if c is not None and c.ingest is not None:
            counters = _copy(c.ingest.counters)
            received = {k: counters.pop(k, 0) for k in MESSAGE_KINDS}
            yield _labelled(CounterMetricFamily, "edgefleet_ingest_messages", "Device messages the ingest took, by kind", "kind", received)
            yield _labelled(
                CounterMetricFamily, "edgefleet_ingest_events", "Ingest outcomes: stored, bad, registered, unregistered", "event", counters
            )
        yield CounterMetricFamily(
            "edgefleet_store_duplicate_batches", "Telemetry batches received again and not stored twice", value=self.store.duplicates
        )
        yield CounterMetricFamily(
            "edgefleet_store_stale_reports", "Device reports older than the one held, not taken", value=self.store.stale_reports
        )
        yield CounterMetricFamily(
            "edgefleet_store_newer_runs",
            "Devices put online by telemetry of a run before its ready status reached the registry (lost, or late)",
            value=self.store.newer_runs,
        )
        yield CounterMetricFamily(
            "edgefleet_store_rejected_messages", "Messages the store could not take (skipped)", value=self.store.rejected
        )
        if c is not None:
            outcomes = {k.removeprefix("status_"): n for k, n in _copy(c.server.counters).items()}
            yield _labelled(
                CounterMetricFamily,
                "edgefleet_repo_requests",
                "Repository requests by outcome: an HTTP-like status, or dropped, bad_request, bad_topic, internal_error",
                "outcome",
                outcomes,
            )


def _copy(counter: Counter[str]) -> Counter[str]:
    """A copy of a counter another thread adds to (paho's): a copy made while a key was added is made again."""
    for _ in range(10):
        try:
            return Counter(counter)
        except RuntimeError:  # dictionary changed size during iteration
            continue
    return Counter()


def _labelled(kind: Any, name: str, documentation: str, label: str, values: dict[str, int]) -> Any:
    family = kind(name, documentation, labels=[label])
    for key, n in sorted(values.items()):
        family.add_metric([key], n)
    return family
