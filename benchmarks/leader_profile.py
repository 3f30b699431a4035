"""Where the leading controller's rollout CPU goes: cProfile and thread CPU time of ``RolloutEngine.tick``.

``python -m benchmarks.leader_profile N OUT``: a fresh PostgreSQL database, mosquitto, the simulated fleet of N devices
in simulator processes (as ``benchmarks.scale``), one ``Controller`` (what ``fleet serve`` runs) in this process, and
a 4-wave zero-soak rollout of 2.0.0. Writes ``OUT/res-N.json`` (engine CPU seconds, in total and per 1,000 devices;
this process's CPU; the rollout's seconds; RSS growth) and the profile sorted by cumulative and own time. A tool
for finding hot spots, not a goal: compare before and after a change on the same machine, in CPU seconds.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.scale import BROKER_CONFIG, WAVES, _shards, fresh_database, repositories, wait_until
from benchmarks.scale_procs import simulator_process

PROFILE = cProfile.Profile()
TICK_CPU = [0.0]


def _profiled_ticks() -> None:
    """Wrap ``RolloutEngine.tick``: the profiler on, and this thread's CPU counted, only while a tick runs."""
    from fleet.rollout import RolloutEngine

    tick = RolloutEngine.tick

    def profiled(self: Any, now: float | None = None) -> None:
        t = time.thread_time()
        PROFILE.enable()
        try:
            tick(self, now)
        finally:
            PROFILE.disable()
            TICK_CPU[0] += time.thread_time() - t

    RolloutEngine.tick = profiled  # type: ignore[method-assign]


def _rollout(store: Any, image: Any, n: int) -> dict[str, Any]:
    from fleet.rollout import RolloutEngine, RolloutSpec

    me = psutil.Process()
    cpu0, rss0 = sum(me.cpu_times()[:2]), me.memory_info().rss
    TICK_CPU[0] = 0.0
    rid = RolloutEngine(store, image).start(RolloutSpec("m", "2.0.0", "device=s*", WAVES, soak_s=0.0))
    t0, rss = time.monotonic(), rss0
    while store.rollout(rid).state == "running" and time.monotonic() - t0 < 900:
        time.sleep(0.5)  # the polling period; the loop ends on the rollout's state
        rss = max(rss, me.memory_info().rss)
    cpu = sum(me.cpu_times()[:2]) - cpu0
    states = store.db.query("SELECT state, count(*) AS n FROM rollout_devices WHERE rollout = ? GROUP BY state", [rid])
    return {
        "devices": n,
        "state": store.rollout(rid).state,
        "rollout_s": round(time.monotonic() - t0, 1),
        "engine_cpu_s": round(TICK_CPU[0], 2),
        "engine_cpu_per_1000_s": round(TICK_CPU[0] * 1000 / n, 2),
        "process_cpu_s": round(cpu, 2),
        "process_cpu_per_1000_s": round(cpu * 1000 / n, 2),
        "rss_growth_mb": round((rss - rss0) / 2**20, 1),
        "states": {r["state"]: int(r["n"]) for r in states},
    }


def run(n: int, out: Path) -> dict[str, Any]:
    from agent.settings import BrokerSettings
    from fleet.controller import Controller
    from fleet.dev.broker import start_broker
    from fleet.store import FleetStore

    out.mkdir(parents=True, exist_ok=True)
    _profiled_ticks()
    with tempfile.TemporaryDirectory() as tmp, fresh_database() as url:
        work = Path(tmp)
        broker = start_broker(work / "broker", extra_config=BROKER_CONFIG)
        sims = []
        try:
            keys, image = repositories(work, [f"{p}-{i:04d}" for p, c in _shards(n) for i in range(c)])
            for p, c in _shards(n):
                sims.append(simulator_process(broker.host, broker.port, p, c, 10.0, work / f"sim-{p}.json"))
                wait_until(lambda p=p: (work / f"sim-{p}.json").exists(), 600, "simulated devices connected")  # type: ignore[misc]
            settings = BrokerSettings(host=broker.host, port=broker.port)
            controller = Controller(work / "serve", keys, store=url, broker=settings, controller_id="profiled").start()
            store = FleetStore(url)
            online = "SELECT count(*) AS n FROM devices WHERE online = 1 AND models LIKE '%\"m\"%'"
            wait_until(lambda: store.db.query(online)[0]["n"] >= n, 600, "devices registered", 1.0)
            result = _rollout(store, image, n)
            controller.stop()
            store.close()
        finally:
            for proc in sims:
                proc.kill()
            broker.stop()
    (out / f"res-{n}.json").write_text(json.dumps(result, indent=1))
    for order in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(PROFILE, stream=text).sort_stats(order).print_stats(50)
        (out / f"profile-{n}-{order}.txt").write_text(text.getvalue())
    return result


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]), Path(sys.argv[2]))))
