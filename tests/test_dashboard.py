"""The dashboard in a real headless Chromium: devices on the page, a rollout's progress changing on screen."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from update_rig import MODEL, Rig, wait_for

from fleet.dashboard import Dashboard
from fleet.dev.simulate import Simulator, SimulatorThread
from fleet.rollout import RolloutEngine, RolloutSpec
from fleet.store import FleetStore
from fleet.transport.ingest import Ingestor

FLEET = [sys.executable, "-m", "fleet.cli"]
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
        wait_for(lambda: getattr(store.rollout(rid), "wave_done", None), 30, "wave 1 soaking")
        during = render(dashboard.url)
        wait_for(lambda: getattr(store.rollout(rid), "state", None) == "done", 60, "the rollout done")
        after = render(dashboard.url)
    finally:
        sims.stop()

    def counts(page: str) -> list[str]:
        block = page.split(f'data-rollout="{rid}"')[1].split('class="rollout"')[0]
        return re.findall(r'class="counts">([^<]*)<', block)

    assert counts(during) == ["1/1", "0/4"] and 'class="state running"' in during
    assert counts(after) == ["1/1", "4/4"] and 'class="state done"' in after
    assert after.count('class="version">1.1.0') >= 5


def test_a_port_alone_binds_loopback_and_any_other_address_needs_a_token(tmp_path: Path) -> None:
    from agent.errors import InvalidOptions
    from fleet.settings import parse_bind

    store = FleetStore(tmp_path / "fleet.db")
    try:
        assert parse_bind(":8080") == ("127.0.0.1", 8080) and parse_bind("8080") == ("127.0.0.1", 8080)
        local = Dashboard(store, *parse_bind(":0")).start()
        try:
            assert local.server.server_address[0] == "127.0.0.1"
            with urllib.request.urlopen(local.url + "api/state", timeout=10) as r:  # loopback, no token set: open
                assert r.status == 200
        finally:
            local.stop()
        with pytest.raises(InvalidOptions, match="needs a token"):
            Dashboard(store, "0.0.0.0", 0)
    finally:
        store.close()


def get(url: str, authorization: str | None = None) -> tuple[int, bytes, list[str]]:
    """A real HTTP request; the status, the body and the WWW-Authenticate challenges."""
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read(), []
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get_all("WWW-Authenticate") or []


def test_fleet_serve_on_every_interface_makes_a_token_once_keeps_it_and_refuses_requests_without_it(rig: Rig, tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text(f'# the operator\'s own note stays\n[broker]\nhost = "{rig.broker.host}"\nport = {rig.broker.port}\n')
    serve = [*FLEET, "serve", str(rig.serve), "--keys", str(rig.keys.directory), "--store", str(tmp_path / "fleet.db")]
    serve += ["--config", str(config), "--http", "0.0.0.0:0"]

    def start(log: Path) -> tuple[subprocess.Popen[bytes], int]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=out)
        port = wait_for(lambda: re.findall(r"dashboard on http://0\.0\.0\.0:(\d+)/", log.read_text()), 60, "the dashboard")[0]
        return proc, int(port)

    first, port = start(tmp_path / "first.log")
    try:
        shown = re.findall(r"dashboard token \(shown once[^)]*\): (\S+)", (tmp_path / "first.log").read_text())
        assert len(shown) == 1
        token = shown[0]
        url = f"http://127.0.0.1:{port}/"
        status, _, challenges = get(url)
        assert status == 401 and any(c.startswith("Bearer") for c in challenges) and any(c.startswith("Basic") for c in challenges)
        assert get(url + "api/state")[0] == 401
        assert get(url + "api/state", "Bearer not-the-token-at-all")[0] == 401
        assert get(url + "api/state", f"Bearer {token}x")[0] == 401
        assert get(url + "api/state", f"Basic {base64.b64encode(b'admin:wrong').decode()}")[0] == 401
        status, body, _ = get(url + "api/state", f"Bearer {token}")
        assert status == 200 and "devices" in json.loads(body)
        assert get(url, f"Bearer {token}")[0] == 200
        assert get(url, f"Basic {base64.b64encode(f'anyone:{token}'.encode()).decode()}")[0] == 200  # what a browser sends
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)
    text = config.read_text()
    assert text.startswith("# the operator's own note stays\n") and f'[dashboard]\ntoken = "{token}"' in text
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    second, port = start(tmp_path / "second.log")  # the kept token: not made again, not shown again
    try:
        assert token not in (tmp_path / "second.log").read_text() and "dashboard token" not in (tmp_path / "second.log").read_text()
        assert get(f"http://127.0.0.1:{port}/api/state", f"Bearer {token}")[0] == 200
        assert get(f"http://127.0.0.1:{port}/api/state")[0] == 401
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
