"""A clustered broker under a rollout: a 3-node NATS cluster (JetStream + MQTT 3.1.1), one node killed mid-rollout.

``python -m benchmarks.broker_cluster [--devices 300] [--quick]``: nats-server nodes on free ports with their own
store dirs (``fleet.dev.nats``), one controller (``Controller``, its own SQLite store) whose first address is node 1,
and ``--devices`` simulated devices spread over the three nodes (one connection each, telemetry every 2 s). Two
3-wave (10%, 50%, 100%), zero-soak rollouts on the same cluster:

- the baseline: 1.0.0 → 2.0.0 with every node up;
- the subject: 2.0.0 → 3.0.0 with node 1 — the controller's and a third of the devices' — ``kill -9``'d as soon as
  the second wave has devices moving.

Figures: both rollout times and their ratio; seconds from the kill until every simulated device was connected
again; telemetry lost (every batch the cluster acknowledged to a simulated device, over both rollouts, must be in the
store by (device, seq)); jobs for 3.0.0 not ``ACTIVE``; devices the registry holds offline once every device is
connected again (a will of a device's own run that reached the registry after its ``ready``, unanswered). Goal
(issue 16): the rollout finishes across the kill and nothing is lost. One pair only: a killed node cannot be unkilled within the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import machine, write
from benchmarks.scale import repositories, wait_until

WAVES = ["10%", "50%", "100%"]
TELEMETRY_S = 2.0


def _second_wave_moving(store: Any, rid: int) -> dict[str, int] | None:
    """The second wave's device states once the rollout runs it with devices told (assigned) or moved, else None."""
    r = store.rollout(rid)
    if r is None or r.state != "running" or r.wave != 1:
        return None
    states: dict[str, int] = {}
    for d in store.rollout_devices(rid, wave=1):
        states[d.state] = states.get(d.state, 0) + 1
    return states if states.get("assigned", 0) + states.get("active", 0) > 0 else None


def _rollout(controller: Any, version: str, kill: Callable[[], None] | None) -> dict[str, Any]:
    """One rollout of ``version`` to every simulated device, timed from its start to its end; ``kill`` is called once
    the second wave has devices told or moved (and the states it found are recorded)."""
    from fleet.rollout import RolloutSpec

    store, engine = controller.store, controller.engine
    t0 = time.monotonic()
    rid = engine.start(RolloutSpec("m", version, "device=bc-*", WAVES, soak_s=0.0))
    out: dict[str, Any] = {"version": version}
    state = "running"
    while state == "running" and time.monotonic() - t0 < 600:
        time.sleep(0.2)  # the polling period; the loop ends on the rollout's state
        if kill is not None and "killed_at_s" not in out and (moving := _second_wave_moving(store, rid)) is not None:
            out.update(killed_at_s=round(time.monotonic() - t0, 1), second_wave_at_kill=moving)
            kill()
        r = store.rollout(rid)
        state = r.state if r is not None else "missing"
    out.update(state=state, rollout_s=round(time.monotonic() - t0, 1))
    out["devices_moved"] = sum(1 for d in store.rollout_devices(rid) if d.state == "active")
    return out


def _offline(store: Any) -> list[str]:
    """Devices the registry holds offline (all of them are connected by then: a late will nobody answered)."""
    return [d.id for d in store.devices() if not d.online]


def run(n: int) -> dict[str, Any]:
    from fleet.controller import Controller
    from fleet.dev.nats import start_nats_cluster
    from fleet.dev.simulate import Simulator, SimulatorThread
    from fleet.tuf.image_repo import variant_target_path

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cluster = start_nats_cluster(work / "nats")
        try:
            broker = cluster.broker_settings(0)
            sim = Simulator("", 0, n, "bc", telemetry_s=TELEMETRY_S, initial={"m": "1.0.0"}, broker=broker)
            keys, _ = repositories(work, [d.id for d in sim.devices])  # m 1.0.0, 2.0.0, 3.0.0; every device on 1.0.0
            controller = Controller(work / "serve", keys, store=work / "fleet.db", tick_s=0.2, broker=broker).start()
            sims = SimulatorThread(sim).start(300)
            try:
                store = controller.store
                assert store is not None, "the controller was given a store"

                def online() -> bool:
                    return sum(1 for d in store.devices() if d.online and d.models) >= n

                out: dict[str, Any] = {"devices": n, "nodes": len(cluster.nodes)}
                try:
                    out["registered_s"] = round(wait_until(online, 300, "every device registered"), 1)
                except TimeoutError as exc:  # say where it stood
                    held = sum(1 for d in store.devices() if d.online and d.models)
                    raise TimeoutError(
                        f"{exc}: {held} of {n} online with models in the registry; the simulator: {sim.connected} connected, "
                        f"{sim.reconnects} reconnections, {len(sim.presence_restored)} wills answered"
                    ) from None
                out["baseline"] = _rollout(controller, "2.0.0", None)
                back: list[float] = []
                node1: list[int] = []  # the devices connected to node 1 at the kill, and the reconnections before it

                def kill() -> None:  # node 1 dies; a watcher times how long until each of its devices is connected again
                    node1[:] = [sum(1 for d in sim.devices if d.address == cluster.addresses[0]), sim.reconnects]

                    def all_back() -> bool:
                        return sim.reconnects - node1[1] >= node1[0] and sim.connected == n

                    cluster.kill(0)
                    threading.Thread(target=lambda: back.append(wait_until(all_back, 300, "node 1's devices back")), daemon=True).start()

                out["killed"] = _rollout(controller, "3.0.0", kill)
                wait_until(lambda: bool(back), 300, "every device of node 1 connected again")
                out["killed"].update(devices_back_s=round(back[0], 1), devices_on_node1=node1[0], reconnects=sim.reconnects - node1[1])
                with contextlib.suppress(TimeoutError):  # whoever is still offline in the registry then is counted below
                    wait_until(lambda: not _offline(store), 30, "every device online in the registry")
                out["presence"] = {"offline_in_registry": len(_offline(store)), "wills_answered": len(sim.presence_restored)}
            finally:
                sims.stop()
            target = variant_target_path("m", "3.0.0", "onnx-fp32")
            want = {(d.id, seq) for d in sim.devices for seq, _ in d.acked}

            def stored() -> set[tuple[str, int]]:
                return {(r["device"], int(r["seq"])) for r in store.db.query("SELECT device, seq FROM batches")}

            def jobs_active() -> int:
                rows = store.db.query("SELECT count(DISTINCT device) AS n FROM jobs WHERE target = ? AND state = 'ACTIVE'", (target,))
                return int(next(iter(rows))["n"])

            try:
                wait_until(lambda: want <= stored() and jobs_active() >= n, 60, "telemetry and job updates stored")
            except TimeoutError:
                pass  # what is missing now is lost: counted below
            have = stored()
            out["lost"] = {
                "telemetry_acknowledged": len(want),
                "telemetry_lost": len(want - have),
                "missing_sample": [f"{d}:{s}" for d, s in sorted(want - have)[:10]],
                "jobs_not_active": n - jobs_active(),
            }
            controller.stop()
            return out
        finally:
            cluster.stop()


def table(r: dict[str, Any]) -> str:
    yes = {True: "yes", False: "NO"}
    b, k, lost, presence = r["baseline"], r["killed"], r["lost"], r["presence"]
    ratio = round(k["rollout_s"] / b["rollout_s"], 2) if b["rollout_s"] else None
    done = all(x["state"] == "done" and x["devices_moved"] == r["devices"] for x in (b, k))
    met = done and "killed_at_s" in k and lost["telemetry_lost"] == 0 and lost["jobs_not_active"] == 0
    rows = [
        "| figure | value | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|",
        f"| 3-wave rollout, {r['devices']} devices on a {r['nodes']}-node NATS cluster, node 1 kill -9'd in wave 2 "
        f"(at {k.get('killed_at_s', '-')} s) | {k['rollout_s']} s ({k['devices_moved']} moved, {k['state']}); every device "
        f"connected again {k['devices_back_s']} s after the kill ({k['devices_on_node1']} were on node 1; {k['reconnects']} "
        f"reconnections) | the same rollout, every node up: "
        f"{b['rollout_s']} s ({b['devices_moved']} moved, {b['state']}) | {ratio} | finished, 0 lost | {yes[met]} |",
        f"| telemetry acknowledged to the devices over both rollouts, lost | {lost['telemetry_lost']} of "
        f"{lost['telemetry_acknowledged']} | - | - | 0 | {yes[lost['telemetry_lost'] == 0]} |",
        f"| jobs for 3.0.0 not ACTIVE | {lost['jobs_not_active']} | - | - | 0 | {yes[lost['jobs_not_active'] == 0]} |",
        f"| devices offline in the registry once every device is connected again (wills of their own run read and "
        f"answered with `ready`: {presence['wills_answered']}) | {presence['offline_in_registry']} | - | - | 0 | "
        f"{yes[presence['offline_in_registry'] == 0]} |",
    ]
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.broker_cluster")
    ap.add_argument("--quick", action="store_true", help="100 devices")
    ap.add_argument("--devices", type=int, help="simulated devices (default 300; --quick 100)")
    ap.add_argument("--results", type=Path, help="where the JSON and the table go (default benchmarks/results)")
    args = ap.parse_args()
    r = run(args.devices or (100 if args.quick else 300))
    print(json.dumps(r), flush=True)
    md = table(r)
    print(md)
    paths = write("broker_cluster", {"machine": machine(), **r}, md, *([args.results] if args.results else []))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
