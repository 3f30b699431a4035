"""The agent's own Prometheus metrics (``telemetry.prometheus = "127.0.0.1:9101"``), for a device scraped on its site.

Why the telemetry windows: the counters here are the windows the agent sends the controller, added up (``Totals``), so
a local Prometheus and the fleet's store count the same calls; they move once per ``telemetry.interval_s``. What is
read live at scrape time: the queue, the models loaded, both broker connections, the outbox's sends, update rounds.

Optional: ``prometheus_client`` is imported only when ``telemetry.prometheus`` is set (``pip install
'edgefleet[metrics]'``); an agent without it runs as before and says why at start.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import InvalidOptions
from agent.settings import parse_address

if TYPE_CHECKING:
    from agent.outbox import Outbox
    from agent.serve.host import ModelHost
    from agent.serve.serving import Serving
    from agent.session import Session


class Agent(Protocol):
    """What the exporter reads of the daemon (agent.daemon.Agent), named here so the daemon, which builds the
    exporter, is not imported back."""

    host: ModelHost
    serving: Serving
    session: Session
    serving_session: Session | None
    outbox: Outbox
    rounds: int


__all__ = ["Exporter", "Totals"]

QUANTILES = (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms"))


class Totals:
    """Every telemetry window added up: answered calls and errors per model version (cumulative, as Prometheus
    counters are), and each version's latency quantiles of its last window with calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answered: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[tuple[str, str, str]] = Counter()  # (model, version, code); version "" : unattributed
        self.latency_ms: dict[tuple[str, str], dict[str, float]] = {}

    def add(self, window: dict[str, Any]) -> None:
        """One window as ``report.Windows.take`` returns it (its ``models`` are ``wire.ModelWindow``)."""
        with self._lock:
            for m in window.get("models", ()):
                key = (m.model, m.version)
                self.answered[key] += m.count
                for code, n in m.errors.items():
                    self.errors[(m.model, m.version, code)] += n
                if m.count and m.p95_ms is not None:
                    self.latency_ms[key] = {field: getattr(m, field) for _, field in QUANTILES}
            for code, n in window.get("unattributed_errors", {}).items():
                self.errors[("", "", code)] += n

    def snapshot(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str, str], int], dict[tuple[str, str], dict[str, float]]]:
        with self._lock:
            return dict(self.answered), dict(self.errors), {k: dict(v) for k, v in self.latency_ms.items()}


class Exporter:
    """``/metrics`` on ``address`` (``HOST:PORT``), read from a running agent at each scrape."""

    def __init__(self, agent: Agent, totals: Totals, address: str) -> None:
        try:
            import prometheus_client  # noqa: F401  (only here: the agent stays lean without the extra)
        except ImportError as exc:
            raise InvalidOptions("telemetry.prometheus needs prometheus-client: pip install 'edgefleet[metrics]'") from exc
        self.agent, self.totals = agent, totals
        self.host, self.port = parse_address(address)
        self._server: Any = None

    def start(self) -> Exporter:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self._server, _ = start_http_server(self.port, self.host, registry)
        self.port = int(self._server.server_address[1])  # port 0: the one the system chose
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def collect(self) -> Iterator[Any]:
        """Called by prometheus_client's HTTP thread at each scrape; reads only (and a failure costs that scrape)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        answered, errors, latency = self.totals.snapshot()
        a = self.agent
        requests = CounterMetricFamily(
            "edgefleet_agent_requests", "Inference calls answered, per model version", labels=["model", "version"]
        )
        for (model, version), n in sorted(answered.items()):
            requests.add_metric([model, version], n)
        errs = CounterMetricFamily(
            "edgefleet_agent_errors",
            "Inference calls answered with an error, per model version and code",
            labels=["model", "version", "code"],
        )
        for (model, version, code), n in sorted(errors.items()):
            errs.add_metric([model, version, code], n)
        lat = GaugeMetricFamily(
            "edgefleet_agent_request_latency_seconds",
            "Latency quantiles of each model version's last telemetry window with calls",
            labels=["model", "version", "quantile"],
        )
        for (model, version), qs in sorted(latency.items()):
            for q, field in QUANTILES:
                if qs.get(field) is not None:
                    lat.add_metric([model, version, q], qs[field] / 1e3)
        yield from (requests, errs, lat, *self._live(a))

    def _live(self, a: Agent) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        info = GaugeMetricFamily(
            "edgefleet_agent_model_info", "The model versions serving now (1 each)", labels=["model", "version", "variant", "runtime"]
        )
        for name, m in sorted(a.host.models().items()):
            info.add_metric([name, m.version, m.variant, m.runtime.name], 1)
        yield info
        yield GaugeMetricFamily("edgefleet_agent_queue_depth", "Inference requests waiting for a worker", value=a.serving.queue_depth())
        connected = GaugeMetricFamily("edgefleet_agent_broker_connected", "1 while the connection is up", labels=["connection"])
        connected.add_metric(["fleet"], int(a.session.is_connected()))
        if a.serving_session is not None:
            connected.add_metric(["serving"], int(a.serving_session.is_connected()))
        yield connected
        yield CounterMetricFamily(
            "edgefleet_agent_rate_limited", "Requests refused as overloaded: their client past its rate", value=a.serving.rate_limited
        )
        yield CounterMetricFamily(
            "edgefleet_agent_telemetry_batches_sent", "Telemetry batches the broker acknowledged", value=a.outbox.sent
        )
        yield CounterMetricFamily("edgefleet_agent_update_rounds", "Update rounds finished, whatever their outcome", value=a.rounds)
