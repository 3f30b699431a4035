"""Several controllers on one store and broker: one leads (the leader lock), the others stand by and take over."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from update_rig import MODEL, VARIANT, Rig, wait_for

from fleet.dev.broker import RunningBroker
from fleet.dev.simulate import Simulator, SimulatorThread
from fleet.leader import Leadership
from fleet.rollout import RolloutEngine, RolloutSpec
from fleet.store import FleetStore


def _one_leads_until_it_lets_go(location: Path | str) -> None:
    first, second = Leadership(location), Leadership(location)
    try:
        assert first.try_acquire() and first.held()
        assert not second.try_acquire() and not second.held()
        assert first.try_acquire(), "taking a held lock again keeps it"
        first.release()
        assert not first.held()
        assert second.try_acquire() and second.held()
        assert not first.try_acquire()
    finally:
        first.release()
        second.release()


def test_leadership_on_postgresql_is_one_advisory_lock() -> None:
    from conftest import fresh_postgres

    with fresh_postgres() as url:
        _one_leads_until_it_lets_go(url)


def test_leadership_on_sqlite_is_a_file_lock_beside_the_database(tmp_path: Path) -> None:
    _one_leads_until_it_lets_go(tmp_path / "fleet.db")
    assert (tmp_path / "fleet.db.leader").exists()


@pytest.fixture(scope="module")
def fleet_rig(models: Any, mqtt_broker: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Rig:
    """Keys and both repositories with mlp 1.0.0 and 1.1.0 released; no controller of its own (the tests start theirs)."""
    r = Rig(tmp_path_factory.mktemp("fleet"), models.path("mlp.onnx"), mqtt_broker)
    for version in ("1.0.0", "1.1.0"):
        r.release(version)
    return r


class Serve:
    """One `fleet serve` process; its log tells whether it leads."""

    def __init__(self, rig: Rig, config: Path, name: str) -> None:
        self.log = config.parent / f"{name}.log"
        cmd = [sys.executable, "-m", "fleet.cli", "serve", str(rig.serve), "--keys", str(rig.keys.directory), "--config", str(config)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)

    def says(self, event: str) -> bool:
        return f"event={event}" in self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _duplicated_batches(store: FleetStore, prefix: str) -> list[dict[str, Any]]:
    return store.db.query(
        "SELECT device, session, seq, model, count(*) AS n FROM telemetry WHERE device LIKE ? GROUP BY device, session, seq, model"
        " HAVING count(*) > 1",
        (f"{prefix}-%",),
    )


def _stored_batches(store: FleetStore, prefix: str) -> int:
    return int(store.db.query("SELECT count(*) AS n FROM batches WHERE device LIKE ?", (f"{prefix}-%",))[0]["n"])


def test_the_standby_takes_over_a_rollout_when_the_leader_is_killed_and_no_telemetry_is_lost(fleet_rig: Rig, tmp_path: Path) -> None:
    """Two `fleet serve` on one PostgreSQL store and one broker: one leads; killed with SIGKILL in the middle of a
    rollout, the other leads within seconds and finishes it from the store; every telemetry batch the devices sent,
    before, during and after the kill, is stored, and exactly once although two controllers took them."""
    from conftest import fresh_postgres

    rig, prefix, n = fleet_rig, "duo", 12
    with fresh_postgres() as url:
        config = tmp_path / "fleet.toml"
        config.write_text(f'store = "{url}"\n[broker]\nhost = "{rig.broker.host}"\nport = {rig.broker.port}\n')
        FleetStore(url).close()  # the schema made once, before two controllers race to open it
        serves = [Serve(rig, config, "a"), Serve(rig, config, "b")]
        sim = Simulator(rig.broker.host, rig.broker.port, n, prefix, telemetry_s=0.2, initial={MODEL: "1.0.0"})
        for d in sim.devices:
            rig.director.assign(d.id, rig.image, MODEL, "1.0.0", VARIANT, rig.keys)
        sims: SimulatorThread | None = None
        store = FleetStore(url)
        try:
            wait_for(lambda: all(s.says("leader.acquired") or s.says("leader.standby") for s in serves), 60, "both controllers up")
            leaders = [s for s in serves if s.says("leader.acquired")]
            assert len(leaders) == 1, [s.log.read_text() for s in serves]
            leader, standby = leaders[0], next(s for s in serves if s is not leaders[0])
            sims = SimulatorThread(sim).start()
            wait_for(lambda: sum(1 for d in store.devices() if d.id.startswith(prefix) and d.online and d.models) == n, 60, "registered")
            spec = RolloutSpec(MODEL, "1.1.0", selector=f"device={prefix}-*", waves=["25%", "50%", "100%"], soak_s=0.0)
            rid = RolloutEngine(store, rig.image).start(spec)
            moved = lambda: sum(1 for d in store.devices() if d.id.startswith(prefix) and d.models.get(MODEL, {}).get("version") == "1.1.0")  # noqa: E731
            wait_for(lambda: moved() >= 1, 60, "the first wave moving")
            leader.proc.kill()  # SIGKILL: no release, no flush; PostgreSQL frees the lock when the connection drops
            leader.proc.wait(10)
            killed = time.monotonic()
            wait_for(lambda: standby.says("leader.acquired"), 10, "the standby leading")
            took_over_s = time.monotonic() - killed
            assert took_over_s < 5, took_over_s
            wait_for(lambda: getattr(store.rollout(rid), "state", "") == "done", 90, "the rollout finished by the new leader")
            assert moved() == n
            after = sim.sent["telemetry"]
            wait_for(lambda: sim.sent["telemetry"] >= after + 2 * n, 30, "telemetry after the takeover")
            sims.stop()
            sims = None
            sent = sim.sent["telemetry"]
            wait_for(lambda: _stored_batches(store, prefix) >= sent, 30, f"all {sent} telemetry batches stored")
            assert _stored_batches(store, prefix) == sent
            assert not _duplicated_batches(store, prefix)
            assert standby.proc.poll() is None, standby.log.read_text()
        finally:
            if sims is not None:
                sims.stop()
            for s in serves:
                s.stop()
            store.close()
