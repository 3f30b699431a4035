"""A real Prometheus server scrapes ``fleet serve``'s /metrics and an agent's own, and has a series of every family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import ModelFiles
from prometheus_server import PrometheusServer
from update_rig import MODEL, Rig, wait_for

from agent.client import EdgeClient, RemoteError
from agent.daemon import Agent
from agent.settings import BrokerSettings, load_settings
from fleet import api
from fleet.dev.broker import RunningBroker, free_port
from fleet.rollout import RolloutSpec

DEVICE = "prom-1"
CONTROLLER_FAMILIES = {
    "edgefleet_devices",
    "edgefleet_model_requests_total",
    "edgefleet_model_server_errors_total",
    "edgefleet_model_client_errors_total",
    "edgefleet_model_latency_p95_seconds",
    "edgefleet_rollouts",
    "edgefleet_rollout_waves",
    "edgefleet_rollout_devices",
    "edgefleet_gate_decisions_total",
    "edgefleet_ingest_messages_total",
    "edgefleet_ingest_events_total",
    "edgefleet_store_duplicate_batches_total",
    "edgefleet_store_rejected_messages_total",
    "edgefleet_repo_requests_total",
}
AGENT_FAMILIES = {
    "edgefleet_agent_requests_total",
    "edgefleet_agent_errors_total",
    "edgefleet_agent_request_latency_seconds",
    "edgefleet_agent_model_info",
    "edgefleet_agent_queue_depth",
    "edgefleet_agent_broker_connected",
    "edgefleet_agent_rate_limited_total",
    "edgefleet_agent_telemetry_batches_sent_total",
    "edgefleet_agent_update_rounds_total",
}


def names(prom: PrometheusServer, job: str) -> set[str]:
    return {r["metric"]["__name__"] for r in prom.query(f'count by (__name__) ({{job="{job}", __name__=~"edgefleet_.+"}})')}


def total(prom: PrometheusServer, expr: str) -> float:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else -1.0


def test_prometheus_scrapes_the_controller_and_an_agent(models: ModelFiles, mqtt_broker: RunningBroker, tmp_path: Path) -> None:
    rig = Rig(tmp_path / "fleet", models.path("mlp.onnx"), mqtt_broker)
    for version in ("1.0.0", "1.1.0"):
        rig.release(version)
    dashboard = f"127.0.0.1:{free_port()}"
    broker = BrokerSettings(host=mqtt_broker.host, port=mqtt_broker.port)
    serving = api.serve(rig.serve, rig.root / "keys", broker, store=tmp_path / "fleet.db", http=dashboard)
    agent_metrics = f"127.0.0.1:{free_port()}"
    config = rig.write_config(DEVICE)
    config.write_text(config.read_text() + f'[telemetry]\ninterval_s = 0.5\nprometheus = "{agent_metrics}"\n')
    agent = Agent(load_settings(config)).start()
    try:
        store, engine = serving.controller.store, serving.controller.engine
        assert store is not None and engine is not None
        wait_for(lambda: (d := store.device(DEVICE)) is not None and d.preferred_variants, 30, "the device registered")
        first = engine.start(RolloutSpec(MODEL, "1.0.0", f"device={DEVICE}", ["100%"], soak_s=0))
        wait_for(lambda: store.rollout(first).state == "done", 60, "the first rollout")  # type: ignore[union-attr]
        engine.start(RolloutSpec(MODEL, "1.1.0", f"device={DEVICE}", ["100%"], soak_s=3600))  # stays soaking: devices in a rollout
        wait_for(lambda: (m := agent.host.get(MODEL)) is not None and m.version == "1.1.0", 60, "1.1.0 installed")
        x = np.random.default_rng(0).uniform(-1, 1, (1, 64)).astype(np.float32)
        with EdgeClient(mqtt_broker.host, mqtt_broker.port) as app:
            for _ in range(10):
                app.infer(DEVICE, MODEL, {"x": x})
            try:
                app.infer(DEVICE, MODEL, {"x": np.zeros((1, 3), np.float32)})
            except RemoteError as exc:
                assert exc.code in ("shape_mismatch", "bad_request")
        with PrometheusServer(tmp_path / "prometheus", {"controller": dashboard, "agent": agent_metrics}) as prom:
            wait_for(lambda: names(prom, "controller") >= CONTROLLER_FAMILIES, 60, "a series of each controller family")
            wait_for(lambda: names(prom, "agent") >= AGENT_FAMILIES, 60, "a series of each agent family")
            assert {r["metric"]["job"] for r in prom.query("up == 1")} == {"controller", "agent"}
            # both count the same telemetry windows: the controller's store and the agent's own counters agree
            wait_for(
                lambda: (
                    total(prom, 'sum(edgefleet_model_requests_total{version="1.1.0"})')
                    == total(prom, 'sum(edgefleet_agent_requests_total{version="1.1.0"})')
                    == 10
                ),
                60,
                "the controller's and the agent's counts to agree",
            )
            assert total(prom, 'edgefleet_rollouts{state="done"}') == 1
            assert total(prom, 'edgefleet_rollout_devices{state="active"}') == 1
            assert total(prom, 'edgefleet_devices{state="online"}') == 1
            assert total(prom, 'edgefleet_agent_model_info{version="1.1.0"}') == 1
    finally:
        agent.stop()
        serving.stop()
