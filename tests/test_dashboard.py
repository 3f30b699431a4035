"""The dashboard in a real headless Chromium: devices on the page, a rollout's progress changing on screen."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from update_rig import MODEL, Rig, wait_for

from fleet.dashboard import Dashboard
from fleet.ingest import Ingestor
from fleet.rollout import RolloutEngine, RolloutSpec
from fleet.simulate import Simulator, SimulatorThread
from fleet.store import FleetStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(url: str) -> str:
    """The page's DOM after its JavaScript ran (one fetch of /api/state), as Chromium built it."""
    assert CHROMIUM, "Chromium is part of the set-up (apt-get install chromium)"
    done = subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split("<script>")[0]  # the rendered body, without the script's own template text


@pytest.fixture
def fleet(rig: Rig, tmp_path: Path) -> Iterator[tuple[FleetStore, RolloutEngine, Dashboard]]:
    store = FleetStore(tmp_path / "fleet.db")
    ingest = Ingestor(store, rig.broker.host, rig.broker.port, client_id="ingest-dash").start()
    engine = RolloutEngine(store, rig.image, rig.director, rig.keys, rig.broker.host, rig.broker.port)
    stop = threading.Event()
    ticker = threading.Thread(target=lambda: [engine.tick() for _ in iter(lambda: stop.wait(0.2), True)], daemon=True)
    ticker.start()
    dashboard = Dashboard(store, "127.0.0.1", 0).start()
    yield store, engine, dashboard
    dashboard.stop()
    stop.set()
    ticker.join(5)
    ingest.stop()
    store.close()


def test_the_page_shows_the_devices_and_a_rollout_moving(rig: Rig, fleet: tuple[FleetStore, RolloutEngine, Dashboard]) -> None:
    store, engine, dashboard = fleet
    sim = Simulator(rig.broker.host, rig.broker.port, 5, "dash", telemetry_s=0.3, initial={MODEL: "1.0.0"})
    for d in sim.devices:
        rig.director.assign(d.id, rig.image, MODEL, "1.0.0", "onnx-fp32", rig.keys)
    sims = SimulatorThread(sim).start()
    try:
        wait_for(lambda: sum(1 for d in store.devices() if d.id.startswith("dash") and d.online and d.models) == 5, 60, "5 devices")
        wait_for(lambda: store.series(0), 30, "telemetry")
        page = render(dashboard.url)
        assert all(f'data-device="dash-{i:04d}"' in page for i in range(5))
        assert page.count('class="version">1.0.0') >= 5 and "<svg" in page  # models and the latency chart
        rid = engine.start(RolloutSpec(MODEL, "1.1.0", selector="device=dash-*", waves=["1", "all"], soak_s=3.0))
        wait_for(lambda: (store.rollout(rid) or {}).get("wave_done"), 30, "wave 1 soaking")
        during = render(dashboard.url)
        wait_for(lambda: (store.rollout(rid) or {}).get("state") == "done", 60, "the rollout done")
        after = render(dashboard.url)
    finally:
        sims.stop()

    def counts(page: str) -> list[str]:
        block = page.split(f'data-rollout="{rid}"')[1].split('class="rollout"')[0]
        return re.findall(r'class="counts">([^<]*)<', block)

    assert counts(during) == ["1/1", "0/4"] and 'class="state running"' in during
    assert counts(after) == ["1/1", "4/4"] and 'class="state done"' in after
    assert after.count('class="version">1.1.0') >= 5
