"""Scale-out: 10,000 simulated devices, PostgreSQL, two controllers — a rollout, a leader killed, ingest against raw.

Four figures, one run (``python -m benchmarks.scale [--devices 10000] [--quick]``):

- **rollout**: two ``fleet serve`` processes on one PostgreSQL database and one mosquitto move ``--devices``
  simulated devices (several simulator processes, one MQTT connection per device, the real director and repository
  messages) from 1.0.0 to 2.0.0 in waves 1%,10%,50%,100% with zero soak. Goal: under 60 s on this machine.
- **controller cost**: both controllers' RSS (above one controller's on an empty store, measured first) and CPU
  seconds, per 1,000 devices, while the fleet only sends telemetry and during the rollout (psutil).
- **leader killed**: the same rollout again (2.0.0 to 3.0.0) with the leading controller ``kill -9``'d in the middle
  of the third wave: seconds until the other logs ``event=leader.acquired``, the rollout finished, and nothing lost —
  every telemetry batch the broker acknowledged to a simulated device (both rollouts) is in the store, and every
  device's job for 3.0.0 ended ``ACTIVE``.
- **ingest**: the same telemetry messages (QoS 1, ``--messages`` per round) received by two raw paho subscribers in one
  ``$share`` group that only count them (the baseline), and stored by two controllers (each way in
  ``INGEST_SUBJECTS``), in alternating rounds; the ratio per round, its median and spread; lost = published minus
  batches in the store. Goal: at least 0.9 of the baseline, 0 lost.

What the controllers run with is in ``ROLLOUT_CONTROLLER`` and ``INGEST_SUBJECTS`` below and nowhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing as mp
import secrets
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import machine, write
from benchmarks.scale_procs import (
    Serve,
    controller_process,
    device_ids,
    go,
    raw_subscriber,
    register_devices,
    simulator_process,
    start_publishers,
    wait_published,
)

# ---- what the controllers run with: the one place to switch
# Controller keywords for the rollout and the kill; {} is `fleet serve` exactly as shipped (on MQTT 5 with a store:
# telemetry and job updates split by $share, each message acknowledged after the store committed it).
ROLLOUT_CONTROLLER: dict[str, Any] = {}
# The ingest comparison's subjects: a name and the Controller keywords each of the two controllers runs with.
INGEST_SUBJECTS: dict[str, dict[str, Any]] = {
    "split by $share (as shipped)": {},
    "each takes all": {"shared_ingest": False},
}
# ----

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"  # EDGEFLEET_TEST_POSTGRES replaces it, as for the tests
SHARD = 2500  # simulated devices per simulator process
WAVES = ["1%", "10%", "50%", "100%"]
GOAL_S = 60.0
INGEST_GOAL = 0.9
# mosquitto: no queue limit for the controllers' ingest (a burst past max_queued_messages is dropped at the broker),
# and room for 10,000 connections (file descriptors: the shell's `ulimit -n` must allow them too).
BROKER_CONFIG = ["max_queued_messages 0", "max_inflight_messages 1000", "max_connections -1"]
RAW_GROUP = "bench-raw"


def _admin_url() -> str:
    import os

    return os.environ.get("EDGEFLEET_TEST_POSTGRES", POSTGRES_ADMIN)


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new PostgreSQL database for one part of the run, dropped afterwards (connections and all)."""
    import psycopg

    admin = _admin_url()
    name = f"edgefleet_scale_{secrets.token_hex(5)}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.25) -> float:
    """Poll ``check`` until it holds; seconds waited. Past ``timeout``: ``TimeoutError`` naming ``what``."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - t0


def _count(store: Any, sql: str, params: tuple[Any, ...] = ()) -> int:
    return int(store.db.query(sql, params)[0]["n"])


def _write_config(path: Path, url: str, host: str, port: int) -> Path:
    path.write_text(f'store = "{url}"\n[broker]\nhost = "{host}"\nport = {port}\n')
    return path


@dataclass
class Rig:
    """One fleet: broker, database, repositories, simulator shards, controllers."""

    work: Path
    n: int
    host: str
    port: int
    url: str
    config: Path
    keys: Any
    image: Any
    store: Any = None
    serves: list[Serve] = field(default_factory=list)
    sims: list[tuple[Any, Path]] = field(default_factory=list)
    broker_pid: int = 0
    ingesting_since: float = float("inf")  # time.time() once a controller was seen up (its ingest subscribed before)

    def serve(self, name: str, options: dict[str, Any]) -> Serve:
        s = controller_process(self.work / "serve", self.keys.directory, self.config, options, self.work / f"{name}.log")
        self.serves.append(s)
        return s

    def leader(self) -> Serve:
        live = [s for s in self.serves if s.proc.poll() is None and s.says("leader.acquired")]
        if len(live) != 1:
            raise RuntimeError(f"{len(live)} live controllers say they lead")
        return live[0]

    def online(self) -> int:
        return _count(self.store, "SELECT count(*) AS n FROM devices WHERE online = 1 AND models LIKE ?", ('%"m"%',))


def repositories(work: Path, devices: list[str]) -> tuple[Any, Any]:
    """Keys, the image repository with m 1.0.0, 2.0.0 and 3.0.0, and every device assigned 1.0.0 (the fleet as it was)."""
    from converters import builders
    from converters.build import build
    from fleet.tuf.director import Assignment, Director
    from fleet.tuf.image_repo import ImageRepository
    from fleet.tuf.keys import init_keys

    keys = init_keys(work / "keys")
    image = ImageRepository.create(work / "serve" / "image", keys)
    director = Director.create(work / "serve" / "director", keys)
    onnx = builders.write_onnx_mlp(builders.random_mlp([4, 4], seed=1), work / "m.onnx")
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        build(onnx, "m", v, work / f"m-{v}", variants=["onnx-fp32"])
        image.release(work / f"m-{v}", keys)
    t0 = time.perf_counter()
    for i in range(0, len(devices), 500):
        done = director.assign_many([Assignment(d, "m", "1.0.0", "onnx-fp32") for d in devices[i : i + 500]], image, keys)
        failed = {d: r for d, r in done.items() if isinstance(r, Exception)}
        if failed:
            raise RuntimeError(f"could not assign {len(failed)} devices: {next(iter(failed.values()))}")
    print(f"director metadata for {len(devices)} devices signed in {time.perf_counter() - t0:.1f} s", flush=True)
    return keys, image


def _shards(n: int) -> list[tuple[str, int]]:
    """(prefix, count) per simulator process: devices ``s0-0000``, ``s1-0000``, ..."""
    return [(f"s{k}", min(SHARD, n - k * SHARD)) for k in range((n + SHARD - 1) // SHARD)]


def _idle_rss(rig: Rig) -> int:
    """RSS of one controller on the (still empty) store with no device connected: what the per-device figures are above."""
    s = controller_process(rig.work / "serve", rig.keys.directory, rig.config, ROLLOUT_CONTROLLER, rig.work / "idle.log")
    try:
        wait_until(lambda: s.says("leader.acquired"), 60, "the idle controller leading")
        time.sleep(2.0)  # settle after start: the figure is a resting process, not a wait for a condition
        return int(psutil.Process(s.proc.pid).memory_info().rss)
    finally:
        s.stop()


def _wait_shard(proc: Any, out: Path) -> None:
    """Until the shard wrote that every one of its devices is connected; a shard that exited instead is an error."""
    wait_until(lambda: out.exists() or proc.poll() is not None, 600, "simulated devices connected")
    if proc.poll() is not None:
        raise RuntimeError(f"a simulator shard exited: {out.with_suffix('.log').read_text()[-2000:]}")


def _start_fleet(rig: Rig, telemetry_s: float) -> dict[str, float]:
    """Simulator shards first (their retained status and reports register them all when the controllers subscribe;
    live newcomers would be budgeted at 1,000 a minute), then the two controllers; seconds each step took."""
    from fleet.store import FleetStore

    t0 = time.monotonic()
    for prefix, count in _shards(rig.n):
        out = rig.work / f"sim-{prefix}.json"
        rig.sims.append((simulator_process(rig.host, rig.port, prefix, count, telemetry_s, out), out))
    for proc, out in rig.sims:
        _wait_shard(proc, out)
    connected_s = time.monotonic() - t0
    rig.serve("a", ROLLOUT_CONTROLLER)
    rig.serve("b", ROLLOUT_CONTROLLER)
    rig.store = FleetStore(rig.url)
    wait_until(lambda: any(s.says("leader.acquired") or s.says("leader.standby") for s in rig.serves), 120, "a controller up", 0.05)
    rig.ingesting_since = time.time()
    wait_until(lambda: all(s.says("leader.acquired") or s.says("leader.standby") for s in rig.serves), 120, "both controllers up")
    registered_s = wait_until(lambda: rig.online() >= rig.n, 600, f"{rig.n} devices registered", every=1.0)
    return {"devices_connected_s": round(connected_s, 1), "registered_after_start_s": round(registered_s, 1)}


def _cpu_s(procs: list[psutil.Process]) -> list[float]:
    return [sum(p.cpu_times()[:2]) for p in procs]


def _steady(rig: Rig, seconds: float) -> dict[str, float]:
    """Each controller's CPU % while the fleet only sends telemetry (no rollout), over ``seconds``, after as long
    again for the start-up work (the retained backlog, the new leader's first check of every device's metadata)."""
    leader = rig.leader()
    procs = {("leader" if s is leader else "standby"): psutil.Process(s.proc.pid) for s in rig.serves}
    time.sleep(seconds)  # settling, then the measuring window itself: both are time spans, not waits for a condition
    before = _cpu_s(list(procs.values()))
    time.sleep(seconds)
    return {role: round(100 * (b - a) / seconds, 1) for role, a, b in zip(procs, before, _cpu_s(list(procs.values())))}


class _Sampler:
    """CPU seconds and RSS of the controllers during one rollout, sampled while they live (one may be killed), and the
    CPU seconds of the other processes the rollout moves: the simulator shards (the load generator), the broker and
    PostgreSQL's (its server and every backend, also those started during the rollout). Sampled every 0.25 s: a
    backend that starts and ends between two samples, and what a process spends after its last, are not counted;
    nor are this benchmark's own process and the kernel."""

    def __init__(self, serves: list[Serve], others: dict[str, list[int]]) -> None:
        self.procs = {s.log.stem: psutil.Process(s.proc.pid) for s in serves if s.proc.poll() is None}
        self.cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in self.procs.items()}
        self.cpu = dict(self.cpu0)
        self.rss = {k: 0 for k in self.procs}
        self.others = others  # role -> pids (PostgreSQL's are found by name at each sample)
        self.other_cpu: dict[tuple[str, int], list[float]] = {}  # (role, pid) -> [first seen, last seen] CPU seconds
        self._sample_others(first=True)

    def _sample_others(self, first: bool = False) -> None:
        pids = [(role, pid) for role, ps in self.others.items() for pid in ps]
        pids += [("postgresql", p.pid) for p in psutil.process_iter(["name"]) if p.info["name"] in ("postgres", "postmaster")]
        for key in pids:
            with contextlib.suppress(psutil.Error):
                now = sum(psutil.Process(key[1]).cpu_times()[:2])
                seen = self.other_cpu.setdefault(key, [now if first else 0.0, now])
                seen[1] = now

    def sample(self) -> None:
        for k, p in self.procs.items():
            with contextlib.suppress(psutil.Error):
                self.cpu[k] = sum(p.cpu_times()[:2])
                self.rss[k] = max(self.rss[k], p.memory_info().rss)
        self._sample_others()

    def report(self, roles: dict[str, str]) -> dict[str, dict[str, float]]:
        return {
            roles.get(k, k): {"cpu_s": round(self.cpu[k] - self.cpu0[k], 2), "rss_mb_max": round(self.rss[k] / 2**20, 1)}
            for k in self.procs
        }

    def others_cpu_s(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (role, _), (first, last) in self.other_cpu.items():
            out[role] = round(out.get(role, 0.0) + last - first, 2)
        return out


def _third_wave_moving(store: Any, rid: int) -> dict[str, int] | None:
    """The third wave's device states once it has devices moving (assigned or active), else None."""
    rows = store.db.query("SELECT state, count(*) AS n FROM rollout_devices WHERE rollout = ? AND wave = 2 GROUP BY state", (rid,))
    states = {r["state"]: int(r["n"]) for r in rows}
    return states if states.get("assigned", 0) + states.get("active", 0) > 0 else None


def _kill_leader(rig: Rig, leader: Serve) -> float:
    """``kill -9`` the leader; seconds until another controller logs that it leads."""
    leader.proc.kill()
    leader.proc.wait(10)
    others = [s for s in rig.serves if s is not leader and s.proc.poll() is None]
    return wait_until(lambda: any(s.says("leader.acquired") for s in others), 120, "a standby leading", every=0.02)


def _rollout(rig: Rig, version: str, kill: bool, timeout: float = 1800.0) -> dict[str, Any]:
    """One 4-wave, zero-soak rollout of ``version`` over the whole fleet, timed from its start to its end; with
    ``kill`` the leader is ``kill -9``'d as soon as the third wave has devices moving."""
    from fleet.rollout import RolloutEngine, RolloutSpec

    leader = rig.leader()
    roles = {s.log.stem: ("leader" if s is leader else "standby") for s in rig.serves}
    sampler = _Sampler(rig.serves, {"simulators": [proc.pid for proc, _ in rig.sims], "broker": [rig.broker_pid]})
    spec = RolloutSpec("m", version, "device=s*", WAVES, soak_s=0.0)
    out: dict[str, Any] = {"version": version, "devices": rig.n}
    t0 = time.monotonic()
    rid = RolloutEngine(rig.store, rig.image).start(spec)
    state = "running"
    waves: dict[int, dict[str, float]] = {}  # each wave's start and settling, seconds from the rollout's start
    while state == "running" and time.monotonic() - t0 < timeout:
        time.sleep(0.25)  # the polling period; the loop ends on the rollout's state
        sampler.sample()
        r = rig.store.rollout(rid)
        state = r.state if r is not None else "missing"
        if r is not None:
            seen = waves.setdefault(r.wave + 1, {"started_s": round(time.monotonic() - t0, 1)})
            if r.wave_done and "settled_s" not in seen:
                seen["settled_s"] = round(time.monotonic() - t0, 1)
        if kill and "killed_at_s" not in out and (moving := _third_wave_moving(rig.store, rid)) is not None:
            out.update(killed_at_s=round(time.monotonic() - t0, 1), third_wave_at_kill=moving)
            out["takeover_s"] = round(_kill_leader(rig, leader), 2)
    out.update(state=state, rollout_s=round(time.monotonic() - t0, 1), waves=waves)
    out["devices_moved"] = _count(rig.store, "SELECT count(*) AS n FROM rollout_devices WHERE rollout = ? AND state = 'active'", (rid,))
    out["controllers"] = sampler.report(roles)
    out["others_cpu_s"] = sampler.others_cpu_s()  # where the rest of the two cores went
    return out


def _reported(out: Path) -> bool:
    """The shard wrote its final report (not only that it was ready)."""
    return "sent" in json.loads(out.read_text())


def _reported_or_exited(proc: subprocess.Popen[bytes], out: Path) -> bool:
    return _reported(out) or proc.poll() is not None


def _stop_simulators(rig: Rig) -> tuple[dict[str, list[tuple[int, float]]], dict[str, int]]:
    """SIGTERM every shard; (telemetry batches the broker acknowledged, per device (seq, when); totals sent)."""
    for proc, _ in rig.sims:
        proc.terminate()
    acked: dict[str, list[tuple[int, float]]] = {}
    sent = {"telemetry": 0, "jobs": 0, "reconnects": 0}
    for proc, out in rig.sims:
        wait_until(functools.partial(_reported_or_exited, proc, out), 180, "a simulator shard's report")
        if not _reported(out):
            raise RuntimeError(f"a simulator shard exited without its report: {out.with_suffix('.log').read_text()[-2000:]}")
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # its report is written; what is left is asyncio's shutdown of abandoned devices
            proc.kill()
            proc.wait(10)
        report = json.loads(out.read_text())
        acked.update(report.get("acked", {}))
        sent["telemetry"] += report["sent"]["telemetry"]
        sent["jobs"] += report["sent"]["jobs"]
        sent["reconnects"] += report["reconnects"]
    rig.sims = []
    return acked, sent


def _nothing_lost(rig: Rig, version: str) -> dict[str, Any]:
    """After both rollouts: every telemetry batch a device had acknowledged is in the store (by device and seq), and
    every device's job for ``version`` ended ACTIVE."""
    from fleet.tuf.image_repo import variant_target_path

    acked, sent = _stop_simulators(rig)
    # a batch acknowledged before any controller subscribed went to nobody (telemetry is not retained): not counted
    want = {(d, seq) for d, batches in acked.items() for seq, at in batches if at > rig.ingesting_since}
    stored: set[tuple[str, int]] = set()

    def all_stored() -> bool:
        stored.clear()
        stored.update((r["device"], int(r["seq"])) for r in rig.store.db.query("SELECT device, seq FROM batches"))
        return want <= stored

    target = variant_target_path("m", version, "onnx-fp32")

    def jobs_active() -> int:
        return _count(rig.store, "SELECT count(DISTINCT device) AS n FROM jobs WHERE target = ? AND state = 'ACTIVE'", (target,))

    # the ingest's last flush, and what the killed controller's session held until the leader adopted and drained it
    # (fleet/transport/adopt.py: every few seconds); whatever is still missing after this is lost
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: all_stored() and jobs_active() >= rig.n, 60, "telemetry and job updates stored", every=2.0)
    active = jobs_active()
    return {
        **sent,
        "missing_sample": [f"{d}:{seq}" for d, seq in sorted(want - stored)[:10]],
        "telemetry_acknowledged": len(want),
        "telemetry_stored": len(stored & want),
        "telemetry_lost": len(want - stored),
        "stored_unacknowledged": len(stored - want),  # published as a shard stopped, before its acknowledgement
        "jobs_active": active,
        "jobs_lost": rig.n - active,
    }


def fleet_run(n: int, telemetry_s: float, steady_s: float) -> dict[str, Any]:
    """The rollout, the controllers' cost and the rollout with the leader killed, on one fleet of ``n`` devices."""
    from fleet.dev.broker import start_broker
    from fleet.store import FleetStore

    with tempfile.TemporaryDirectory() as tmp, fresh_database() as url:
        work = Path(tmp)
        broker = start_broker(work / "broker", extra_config=BROKER_CONFIG)
        rig: Rig | None = None
        try:
            keys, image = repositories(work, [f"{p}-{i:04d}" for p, c in _shards(n) for i in range(c)])
            FleetStore(url).close()  # the schema made once, before two controllers race to make it
            config = _write_config(work / "fleet.toml", url, broker.host, broker.port)
            rig = Rig(work, n, broker.host, broker.port, url, config, keys, image, broker_pid=broker.pid)
            out: dict[str, Any] = {"devices": n, "simulator_processes": len(_shards(n)), "telemetry_s": telemetry_s}
            out["idle_controller_rss_mb"] = round(_idle_rss(rig) / 2**20, 1)
            out.update(_start_fleet(rig, telemetry_s))
            out["steady_cpu_percent"] = _steady(rig, steady_s)
            out["rollout"] = _rollout(rig, "2.0.0", kill=False)
            print(json.dumps(out["rollout"]), flush=True)
            out["killed"] = _rollout(rig, "3.0.0", kill=True)
            print(json.dumps(out["killed"]), flush=True)
            out["killed"]["lost"] = _nothing_lost(rig, "3.0.0")
            out["killed"]["survivor_running"] = any(s.proc.poll() is None for s in rig.serves)
            return out
        finally:
            if rig is not None:
                for proc, _ in rig.sims:
                    proc.kill()
                for s in rig.serves:
                    s.stop()
                if rig.store is not None:
                    rig.store.close()
            broker.stop()


def _raw_round(host: str, port: int, devices: int, n: int, session: int) -> dict[str, Any]:
    """The baseline: two plain paho subscribers in one ``$share`` group, counting; messages a second from the go."""
    ctx = mp.get_context("spawn")
    counters = [ctx.Value("q", 0, lock=False) for _ in range(2)]
    ready = [ctx.Event() for _ in range(2)]
    stop = ctx.Event()
    procs = [ctx.Process(target=raw_subscriber, args=(host, port, RAW_GROUP, i, counters[i], ready[i], stop)) for i in range(2)]
    for p in procs:
        p.start()
    try:
        if not all(r.wait(60) for r in ready):
            raise RuntimeError("a raw subscriber did not subscribe")
        pubs = start_publishers(host, port, "ing", devices, n, session)
        t0 = go(pubs)
        wait_published(pubs)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: sum(c.value for c in counters) >= n, 300, "raw subscribers", every=0.1)
        elapsed = time.monotonic() - t0
        received = sum(c.value for c in counters)
    finally:
        stop.set()
        for p in procs:
            p.join(30)
    return {"msgs_per_s": round(received / elapsed), "received": received, "lost": n - received}


def _controllers_round(
    work: Path, keys: Path, host: str, port: int, devices: int, n: int, session: int, options: dict[str, Any]
) -> dict[str, Any]:
    """The subject: two controllers (``options``) on a fresh database; messages a second from the go until the store
    holds every batch (polled as often as the baseline's counters)."""
    from fleet.store import FleetStore

    with fresh_database() as url:
        FleetStore(url).close()
        config = _write_config(work / f"ingest-{session}.toml", url, host, port)
        serves = [controller_process(work / "serve", keys, config, options, work / f"ingest-{session}-{k}.log") for k in (0, 1)]
        store = FleetStore(url)
        try:
            wait_until(lambda: all(s.says("leader.acquired") or s.says("leader.standby") for s in serves), 120, "controllers up")
            wait_until(lambda: _count(store, "SELECT count(*) AS n FROM devices") >= devices, 120, "devices registered")
            pubs = start_publishers(host, port, "ing", devices, n, session)
            t0 = go(pubs)
            wait_published(pubs)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: _count(store, "SELECT count(*) AS n FROM batches") >= n, 300, "batches stored", every=0.1)
            elapsed = time.monotonic() - t0
            stored = _count(store, "SELECT count(*) AS n FROM batches WHERE session = ?", (session,))
        finally:
            for s in serves:
                s.stop()
            store.close()
    return {"msgs_per_s": round(stored / elapsed), "stored": stored, "lost": n - stored}


def ingest_run(devices: int, messages: int, rounds: int) -> dict[str, Any]:
    """The raw baseline and each subject of ``INGEST_SUBJECTS``, alternating round by round; ratio per round."""
    from fleet.dev.broker import start_broker
    from fleet.tuf.director import Director
    from fleet.tuf.image_repo import ImageRepository
    from fleet.tuf.keys import init_keys

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = start_broker(work / "broker", extra_config=BROKER_CONFIG)
        try:
            keys = init_keys(work / "keys")
            ImageRepository.create(work / "serve" / "image", keys)
            Director.create(work / "serve" / "director", keys)
            register_devices(broker.host, broker.port, device_ids("ing", devices))
            samples: dict[str, list[dict[str, Any]]] = {"raw": [], **{k: [] for k in INGEST_SUBJECTS}}
            session = 0
            for r in range(rounds):
                order = ["raw", *INGEST_SUBJECTS]
                for name in reversed(order) if r % 2 else order:
                    session += 1
                    host, port = broker.host, broker.port
                    if name == "raw":
                        sample = _raw_round(host, port, devices, messages, session)
                    else:
                        options = INGEST_SUBJECTS[name]
                        sample = _controllers_round(work, keys.directory, host, port, devices, messages, session, options)
                    print(f"ingest round {r + 1} {name}: {json.dumps(sample)}", flush=True)
                    samples[name].append(sample)
        finally:
            broker.stop()
    return {"devices": devices, "messages_per_round": messages, "rounds": rounds, "samples": samples, "subjects": _ratios(samples)}


def _ratios(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per subject: its rate over the same round's raw rate, each round; median, spread, total lost."""
    out = {}
    for name in INGEST_SUBJECTS:
        ratios = [round(s["msgs_per_s"] / max(1, raw["msgs_per_s"]), 3) for s, raw in zip(samples[name], samples["raw"])]
        lost = sum(s["lost"] for s in samples[name])
        median = statistics.median(ratios)
        out[name] = {
            "options": INGEST_SUBJECTS[name],
            "ratios": ratios,
            "ratio_median": round(median, 3),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "msgs_per_s_median": statistics.median(s["msgs_per_s"] for s in samples[name]),
            "lost": lost,
            "goal_met": median >= INGEST_GOAL and lost == 0,
        }
    return out


def per_thousand(value: float, n: int) -> float:
    return round(value * 1000 / n, 2)


def fleet_rows(fleet: dict[str, Any]) -> list[str]:
    """Table rows for the rollout, the kill and the controllers' cost."""
    yes = {True: "yes", False: "NO"}
    n, a, k = fleet["devices"], fleet["rollout"], fleet["killed"]
    lost = k["lost"]
    rollout_met = a["state"] == "done" and a["devices_moved"] == n and a["rollout_s"] < GOAL_S
    kill_met = k["state"] == "done" and k["devices_moved"] == n and lost["telemetry_lost"] == 0 and lost["jobs_lost"] == 0
    idle = fleet["idle_controller_rss_mb"]
    ctl = a["controllers"]
    rss = ", ".join(f"{role} {per_thousand(c['rss_mb_max'] - idle, n)} MB" for role, c in sorted(ctl.items()))
    cpu = ", ".join(f"{role} {per_thousand(c['cpu_s'], n)} s" for role, c in sorted(ctl.items()))
    steady = ", ".join(f"{role} {per_thousand(p, n)}%" for role, p in sorted(fleet["steady_cpu_percent"].items()))
    spent = {**{role: c["cpu_s"] for role, c in ctl.items()}, **a.get("others_cpu_s", {})}
    where = ", ".join(f"{role} {s:.1f}" for role, s in sorted(spent.items(), key=lambda kv: -kv[1]))
    return [
        f"| 4-wave rollout, {n} devices ({fleet['simulator_processes']} simulator processes), zero soak, PostgreSQL, 2 controllers "
        f"| {a['rollout_s']} s ({a['devices_moved']} moved, {a['state']}) | - | - | < {GOAL_S:.0f} s | {yes[rollout_met]} |",
        f"| same rollout, leader kill -9'd in wave 3 (at {k.get('killed_at_s', '-')} s) | other leads after {k.get('takeover_s', '-')} s; "
        f"{k['rollout_s']} s ({k['devices_moved']} moved, {k['state']}); telemetry lost {lost['telemetry_lost']} of "
        f"{lost['telemetry_acknowledged']}; jobs not ACTIVE {lost['jobs_lost']} | - | - | finished, 0 lost | {yes[kill_met]} |",
        f"| controller RSS per 1,000 devices (above an idle controller's {idle} MB) | {rss} | - | - | - | - |",
        f"| controller CPU per 1,000 devices during the rollout | {cpu} | - | - | - | - |",
        f"| CPU seconds during the rollout by process, sampled every 0.25 s ({2 * a['rollout_s']:.0f} on two cores) "
        f"| {where} | - | - | - | - |",
        f"| controller CPU per 1,000 devices, telemetry only (every {fleet['telemetry_s']:.0f} s) | {steady} | - | - | - | - |",
    ]


def ingest_rows(ingest: dict[str, Any]) -> list[str]:
    """Table rows for the ingest comparison, one per subject."""
    yes = {True: "yes", False: "NO"}
    raw = statistics.median(s["msgs_per_s"] for s in ingest["samples"]["raw"])
    rows = []
    for name, r in ingest["subjects"].items():
        spread = f"{r['ratio_median']} ({r['ratio_min']}-{r['ratio_max']})"
        rows.append(
            f"| ingest, 2 controllers ({name}), {ingest['messages_per_round']} msgs x {ingest['rounds']} rounds | "
            f"{r['msgs_per_s_median']} msg/s, {r['lost']} lost | 2 raw $share subscribers (stock paho) {raw} msg/s | {spread} "
            f"| >= {INGEST_GOAL}x, 0 lost | {yes[r['goal_met']]} |"
        )
    return rows


def table(fleet: dict[str, Any] | None, ingest: dict[str, Any] | None) -> str:
    """The readable table: every figure, its baseline where it has one, the goal and whether it was met."""
    rows = ["| figure | value | baseline | ratio | goal | met |", "|---|---|---|---|---|---|"]
    rows += fleet_rows(fleet) if fleet else []
    rows += ingest_rows(ingest) if ingest else []
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    ap.add_argument("--quick", action="store_true", help="500 devices telling every 2 s, fewer and shorter ingest rounds")
    ap.add_argument("--only", choices=["fleet", "ingest"], help="only the rollouts and cost, or only the ingest comparison")
    ap.add_argument("--devices", type=int, help="simulated devices (default 10,000; --quick 500)")
    ap.add_argument("--messages", type=int, help="telemetry messages per ingest round (default 50,000; --quick 10,000)")
    ap.add_argument("--rounds", type=int, help="ingest rounds, each subject and the baseline once per round (default 3; --quick 2)")
    ap.add_argument("--telemetry-s", type=float, help="each simulated device's telemetry interval (default 10 s, the agent's; --quick 2)")
    ap.add_argument("--steady-s", type=float, help="the telemetry-only CPU window (default 10; --quick 5)")
    ap.add_argument("--results", type=Path, help="where the JSON and the table go (default benchmarks/results)")
    args = ap.parse_args()
    n = args.devices or (500 if args.quick else 10_000)
    telemetry_s = args.telemetry_s or (2.0 if args.quick else 10.0)
    fleet = ingest = None
    if args.only in (None, "fleet"):
        fleet = fleet_run(n, telemetry_s, args.steady_s or (5.0 if args.quick else 10.0))
    if args.only in (None, "ingest"):
        ingest = ingest_run(min(n, 10_000), args.messages or (10_000 if args.quick else 50_000), args.rounds or (2 if args.quick else 3))
    md = table(fleet, ingest)
    print(md)
    payload = {"machine": machine(), "fleet": fleet, "ingest": ingest, "goals": {"rollout_s": GOAL_S, "ingest_ratio": INGEST_GOAL}}
    paths = write("scale", payload, md, *([args.results] if args.results else []))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
