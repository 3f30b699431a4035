"""Wave rollouts that stop by themselves: on failed installs, and on a new version that behaves worse.

The rollout lives in the store (``FleetStore``): its spec, the current wave, when the
wave started and finished, and every device's state. ``RolloutEngine.tick()`` reads it,
moves it one step and writes it back, so a controller killed and restarted goes on
exactly where it was. A step reads as its three parts: observe (one read of the rollout's
devices, the registry, the install jobs), judge (the pure functions at the end of this
module and ``gates``), act (assign, record, announce); once the wave has settled and soaked,
the same again for the wave: observe its statistics, judge them by a gate, go on or abort.
The health gate's statistics are planned as windows (``health_windows``: each moved device
before and after its move, the unmoved control over the same windows) and summed by the
database, one row per window, never every row of every device (``fleet.store.windows``).

Moving a device means pointing its director metadata at the release (``Director.assign``)
and announcing it; rolling back points it at the version it ran before (a version the
device keeps, which the agent accepts although its release counter is lower).

Device states: pending → assigned → active | failed | timeout; after an abort every
moved device → rolled_back.

Shadow mode (``RolloutSpec.shadow``): the rollout starts in phase "shadow". The first
wave's devices keep serving their version while the director also names the new one
as their shadow (pending → assigned → shadowing | failed | timeout); they run it on
their live inputs and report how often it agrees. Only when the shadow gate passes
(agreement, mean difference, errors, latency of both) does the phase end: the
shadowing devices go back to pending and the wave proceeds as any other, the agent
promoting the shadow it already has loaded.

Prediction drift: devices publish sums of what each version answered
(``agent.serve.predictions``); the health gate compares the wave's distribution on the new
version with the rest of the fleet's on the old one (top-class shift, mean shift).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from agent import logs
from agent.errors import EdgefleetError
from agent.settings import BrokerSettings
from fleet.rollout import gates, plan
from fleet.rollout.spec import RolloutError, RolloutSpec
from fleet.rollout.stats import DeviceStats
from fleet.store import Device, DeviceChange, FleetStore, Job, Rollout, RolloutDevice, Window, WindowPredictions, WindowTelemetry
from fleet.transport import client as transport
from fleet.transport.announce import announce
from fleet.tuf.director import Assignment, Director
from fleet.tuf.image_repo import ImageRepository, variant_target_path
from fleet.tuf.keys import KeyStore

__all__ = ["RolloutEngine"]

log = logging.getLogger("edgefleet.rollout")

RUNNING, PAUSED, DONE, ABORTED, ABORTING = "running", "paused", "done", "aborted", "aborting"
SHADOW = "shadow"  # the rollout's phase while its first wave runs the new version in shadow
SETTLED = {"active", "shadowing", "failed", "timeout"}
ASSIGN_BATCH = 200  # devices signed, committed, recorded and announced together (one sync and one transaction each)
REANNOUNCE_MAX_S = 60.0  # the longest wait between two announcements to a device that stays silent


@dataclass(frozen=True)
class Told:
    """When a rollout's device was last announced to, and how many times it has been."""

    at: float
    times: int

    def again_after(self, first_s: float) -> float:
        """When to tell again: ``first_s`` after the first time, each wait twice the last, at most REANNOUNCE_MAX_S.
        Why a backoff: a device is silent mostly because it is busy (a wave of thousands on slow devices, a loaded
        load generator) and every announcement makes it fetch its metadata again; a lost one is rare and still
        re-sent within a minute."""
        return self.at + min(first_s * 2 ** (self.times - 1), max(first_s, REANNOUNCE_MAX_S))


@dataclass(frozen=True)
class Observation:
    """What one step sees of a running rollout, read once at its start."""

    rollout: Rollout
    spec: RolloutSpec
    everyone: list[RolloutDevice]  # the rollout's devices, every wave
    registry: dict[str, Device]  # the current wave's pending and assigned devices' records
    jobs: dict[str, Job]  # the last install job on the new version, of the current wave's assigned devices that have one

    @property
    def shadow(self) -> bool:
        return self.rollout.phase == SHADOW

    @property
    def members(self) -> list[RolloutDevice]:
        """The current wave's devices."""
        return [m for m in self.everyone if m.wave == self.rollout.wave]


class RolloutEngine:
    def __init__(
        self,
        store: FleetStore,
        image: ImageRepository,
        director: Director | None = None,
        keys: KeyStore | None = None,
        host: str | None = None,
        port: int | None = None,
        broker: BrokerSettings | None = None,
    ) -> None:
        """``broker`` (TLS, credentials, MQTT version; ``host``/``port`` replace its address) is where announcements go.

        Without ``director`` and ``keys`` the engine takes commands (start, pause, resume, abort, progress: they only
        write the store) but cannot move devices; ``fleet serve`` holds the online key and ticks.
        """
        self.store, self.image, self._director, self._keys = store, image, director, keys
        self.broker = transport.broker_settings(host, port, broker)
        self.host, self.port = self.broker.host, self.broker.port
        self.reannounce_s = 10.0  # a device assigned but silent this long is told again (a lost announcement), then backing off
        self.assign_batch = ASSIGN_BATCH
        self._released: dict[tuple[str, str], tuple[float, list[str]]] = {}  # (model, version): (read at, variant ids)
        self._announced: dict[int, dict[str, Told]] = {}  # rollout id -> device -> when told (rollouts that run)

    @property
    def director(self) -> Director:
        if self._director is None:
            raise RolloutError("this rollout engine takes commands only: moving devices needs the director and its key (fleet serve)")
        return self._director

    @property
    def keys(self) -> KeyStore:
        if self._keys is None:
            raise RolloutError("this rollout engine takes commands only: moving devices needs the director and its key (fleet serve)")
        return self._keys

    # -- commands ---------------------------------------------------------------------------

    def start(self, spec: RolloutSpec) -> int:
        """Check the spec, plan its waves (``plan``) and store the rollout; the next tick starts moving devices."""
        available = self._variants(spec)
        terms = plan.parse_selector(spec.selector)
        spec.waves = plan.parse_waves(spec.waves)
        spec.gates.validate()
        chosen = plan.select(self.store.devices(), terms, spec.selector)
        busy = {r.spec["model"] for r in self.store.rollouts() if r.state in (RUNNING, PAUSED, ABORTING)}
        if spec.model in busy:
            raise RolloutError(f"a rollout of {spec.model} is already running: abort or finish it first")
        waves = plan.plan(spec, chosen, available)
        rid = self.store.create_rollout(spec.to_json(), waves, phase=SHADOW if spec.shadow else "")
        logs.event(log, "rollout.started", id=rid, model=spec.model, version=spec.version, devices=len(chosen), waves=len(waves))
        return rid

    def _variants(self, spec: RolloutSpec) -> list[str]:
        """The released variants of the spec's version; RolloutError when it is not released or lacks the spec's variant."""
        release = self.image.release_of(spec.model, spec.version)
        if release is None:
            self.image.ensure_not_revoked(spec.model, spec.version)  # ReleaseRevoked: the clearer error
            raise RolloutError(f"{spec.model} {spec.version} is not released")
        available = [v.id for v in release.variants]
        if spec.variant is not None and spec.variant not in available:
            raise RolloutError(f"{spec.model} {spec.version} has no variant {spec.variant!r} (it has {', '.join(available)})")
        return available

    def pause(self, rid: int) -> None:
        self._transition(rid, (RUNNING,), state=PAUSED)

    def resume(self, rid: int) -> None:
        self._transition(rid, (PAUSED,), state=RUNNING)

    def abort(self, rid: int, reason: str = "aborted by the operator") -> int:
        """Roll the moved devices back now; the number of devices pointed back."""
        r = self._require(rid, RUNNING, PAUSED, ABORTING)
        return self._abort(r, reason)

    def request_abort(self, rid: int, reason: str = "aborted by the operator") -> None:
        """For a CLI without the director key: the running controller aborts it on its next tick."""
        self._transition(rid, (RUNNING, PAUSED), state=ABORTING, reason=reason)

    def _transition(self, rid: int, states: tuple[str, ...], **fields: Any) -> None:
        """An operator's change, made only while the rollout is in one of ``states`` — checked by the write itself, so
        the leader finishing the rollout in between (another process) is refused here, not written over."""
        self._require(rid, *states)
        if not self.store.update_rollout(rid, only_if=states, **fields):
            self._require(rid, *states)  # raises, naming what it is now
            raise RolloutError(f"rollout {rid} changed while this change was written; try again")

    def _require(self, rid: int, *states: str) -> Rollout:
        r = self.store.rollout(rid)
        if r is None:
            raise RolloutError(f"no rollout {rid}")
        if r.state not in states:
            raise RolloutError(f"rollout {rid} is {r.state}, not {' or '.join(states)}")
        return r

    def progress(self, rid: int) -> dict[str, Any]:
        """The rollout as JSON, with ``waves``: per wave, how many devices are in each state."""
        r = self._require(rid, RUNNING, PAUSED, DONE, ABORTED, ABORTING)
        waves: dict[int, dict[str, int]] = {}
        for m in self.store.rollout_devices(rid):
            w = waves.setdefault(m.wave, {})
            w[m.state] = w.get(m.state, 0) + 1
        return {**r.to_json(), "waves": [waves[k] for k in sorted(waves)]}

    # -- the step: observe -> judge -> act ----------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Move every running rollout one step."""
        rollouts = self.store.rollouts()
        for rid in self._announced.keys() - {r.id for r in rollouts if r.state in (RUNNING, PAUSED)}:
            del self._announced[rid]  # ended (or aborting): nobody is told again
        for r in rollouts:
            try:
                if r.state == ABORTING:
                    self._abort(r, r.reason or "aborted by the operator")
                elif r.state == RUNNING and self._step(r, now or time.time()):
                    self._next_wave_now(r.id, now)
            except Exception as exc:  # one rollout's trouble must not stop the others: logged, retried next tick
                logs.event(log, "rollout.step_failed", logging.ERROR, id=r.id, reason=f"{type(exc).__name__}: {exc}")

    def _next_wave_now(self, rid: int, now: float | None) -> None:
        """A wave just passed its gate: step the next one in this tick, not a tick later, unless the rollout meanwhile
        stopped running (an operator's pause or abort, written by another process while the gate judged)."""
        r = self.store.rollout(rid)
        if r is not None and r.state == RUNNING:
            self._step(r, now or time.time())

    def _step(self, r: Rollout, now: float) -> bool:
        """Observe the rollout once; judge what its devices said (abort on the install gate); move pending devices;
        judge the assigned ones (timeout, tell again); record and announce; once the wave settled, judge the wave.
        True when the wave passed its gate and another wave (or the shadow's switch) is next."""
        seen = self._observe(r)
        changes = judge_reports(seen)
        members = applied(seen.members, changes)
        install = gates.install_gate(seen.spec.gates, sum(1 for m in members if m.state == "failed"), len(members), r.wave)
        if install.decision == gates.ABORT:
            self.store.set_device_states(r.id, changes)
            self._abort(r, install.reason)
            return False
        moves = self._move(seen, members, now)  # recorded and announced batch by batch
        moved = [c.device for c in moves if c.state == "assigned"]
        late, again = judge_assigned(seen, applied(members, moves), set(moved), self._announced.get(r.id, {}), now, self.reannounce_s)
        self._record(r.id, changes + late, again, now, again=True)
        everyone = applied(seen.everyone, changes + moves + late)
        return all(m.state in SETTLED for m in everyone if m.wave == r.wave) and self._wave_settled(seen, everyone, now)

    def _observe(self, r: Rollout) -> Observation:
        """One read of the rollout's devices, the registry records of its current wave's unsettled devices (not the
        whole fleet: the judges look at pending and assigned ones only) and, in one query, the assigned ones' jobs."""
        spec = RolloutSpec.from_json(r.spec)
        everyone = self.store.rollout_devices(r.id)
        wave = [m for m in everyone if m.wave == r.wave and m.state in ("pending", "assigned")]  # the others are settled
        registry = {d.id: d for d in self.store.devices_of(m.device for m in wave)}
        target = {m.variant: variant_target_path(spec.model, spec.version, m.variant) for m in wave}
        wanted = {m.device: target[m.variant] for m in wave if m.state == "assigned" and m.device in registry}
        jobs = self.store.last_jobs(wanted) if wanted else {}
        return Observation(r, spec, everyone, registry, jobs)

    def _move(self, seen: Observation, members: list[RolloutDevice], now: float) -> list[DeviceChange]:
        """Act: point the wave's pending devices that are online at the new version, as many as the rate limit allows,
        ``assign_batch`` at a time (``Director.assign_many``); each batch is recorded and announced as soon as it is
        signed, so a wave of thousands is not held until the whole tick ends (and then told again as silent).
        Every moved device's ``assigned_at`` is the step's ``now``: one split time for the whole tick's moves."""
        budget, chosen, timeouts = judge_budget(seen.spec, seen.everyone, now), [], []
        for m, action in judge_pending(seen, members, now):
            if budget <= 0:
                break
            if action == "timeout":
                timeouts.append(DeviceChange(m.device, "timeout", "offline for the whole wave"))
            elif action == "assign":
                chosen.append(m)
                budget -= 1
        self._record(seen.rollout.id, timeouts, [], now)
        changes, started = list(timeouts), time.monotonic()
        for i in range(0, len(chosen), self.assign_batch):
            batch = chosen[i : i + self.assign_batch]
            results = self.director.assign_many([self._assignment(seen, m) for m in batch], self.image, self.keys)
            done = [self._assigned(seen.rollout.id, m.device, results.get(m.device), now) for m in batch]
            moved = [c.device for c in done if c.state == "assigned"]
            self._record(seen.rollout.id, done, moved, now + (time.monotonic() - started))
            changes += done
        return changes

    def _assigned(self, rid: int, device: str, result: object, now: float) -> DeviceChange:
        """What assigning ``device`` did: assigned, or failed alone (a bad id, a signing error: logged)."""
        if isinstance(result, Exception) or result is None:
            why = f"{type(result).__name__}: {result}" if result is not None else "not assigned"
            logs.event(log, "rollout.assign_failed", logging.ERROR, id=rid, device=device[:80], reason=why[:200])
            return DeviceChange(device, "failed", f"could not assign: {why}"[:300])
        return DeviceChange(device, "assigned", "", now)

    def _assignment(self, seen: Observation, m: RolloutDevice) -> Assignment:
        spec = seen.spec
        if seen.shadow:  # keep serving what it runs (those exact bytes: its own variant), the new version beside it
            serving = str(seen.registry[m.device].models.get(spec.model, {}).get("variant", ""))
            variant = self._variant_of(spec.model, m.previous, serving)
            return Assignment(m.device, spec.model, m.previous, variant, shadow=(spec.version, m.variant))
        return Assignment(m.device, spec.model, spec.version, m.variant)

    def _record(self, rid: int, changes: list[DeviceChange], told: list[str], now: float, again: bool = False) -> None:
        """Act: store the devices' new states, then announce to the devices moved (or, ``again``, told again: their
        wait for the next telling doubles); ``now``: when told."""
        self.store.set_device_states(rid, changes)
        if told:
            announce(self.director, told, broker=self.broker)  # raises when the broker is away: not told, not counted
            mark_told(self._announced.setdefault(rid, {}), told, now, again)

    def _wave_settled(self, seen: Observation, everyone: list[RolloutDevice], now: float) -> bool:
        """Every device of the wave settled: after the soak, judge the wave by its gate and go on (True when a wave or the
        shadow's switch is next), or abort."""
        r, spec = seen.rollout, seen.spec
        if not r.wave_done:
            self.store.update_rollout(r.id, wave_done=now)
            r = replace(r, wave_done=now)
        if now - r.wave_done < spec.soak_s:
            return False
        members = [m for m in everyone if m.wave == r.wave]
        verdict = self._shadow_gate(spec, r, members, now) if seen.shadow else self._health_gate(spec, r, everyone, now)
        if verdict.decision == gates.WAIT:
            return False
        if verdict.decision == gates.ABORT:
            self._abort(r, verdict.reason)
            return False
        logs.event(log, "rollout.gate_passed", id=r.id, wave=r.wave + 1, phase=r.phase or "health", detail=verdict.reason)
        if seen.shadow:
            self._end_shadow(r, members, now)
            return True
        if r.wave >= len(spec.waves) - 1 or not any(m.wave == r.wave + 1 for m in everyone):
            if self.store.update_rollout(r.id, only_if=(RUNNING,), state=DONE, reason="every wave done"):
                logs.event(log, "rollout.done", id=r.id)  # else paused or aborted meanwhile: the operator's word stands
            return False
        if not self.store.update_rollout(r.id, only_if=(RUNNING,), wave=r.wave + 1, wave_started=now, wave_done=0):
            return False  # paused or aborted while the gate judged: the next wave waits for a resume
        logs.event(log, "rollout.wave", id=r.id, wave=r.wave + 2)
        return True

    def _end_shadow(self, r: Rollout, members: list[RolloutDevice], now: float) -> None:
        """The shadow convinced: the same wave now switches for real."""
        back = [DeviceChange(m.device, "pending", "shadow gate passed") for m in members if m.state == "shadowing"]
        self.store.set_device_states(r.id, back)
        self.store.update_rollout(r.id, phase="", wave_started=now, wave_done=0)
        logs.event(log, "rollout.shadow_passed", id=r.id, devices=len(back))

    def _health_gate(self, spec: RolloutSpec, r: Rollout, everyone: list[RolloutDevice], now: float) -> gates.Verdict:
        """Observe the wave's moved devices and the unmoved control (their windows' sums, made by the database), then judge."""
        moved = [m for m in everyone if m.state == "active" and m.wave == r.wave]
        unmoved = [m for m in everyone if m.state == "pending" and m.previous]
        if not moved:
            return gates.Verdict(gates.GO, "no device of the wave moved")
        if now - r.wave_started < spec.wave_timeout_s:  # first the cheap question: has every moved device reported yet?
            first = min(m.assigned_at for m in moved)
            reported = self.store.last_reports(spec.model, spec.version, [m.device for m in moved], first, now + 1)
            waiting = judge_silent(spec, moved, reported)
            if waiting is not None:
                return waiting
        windows = health_windows(spec, moved, unmoved, now)  # plan the reads, read the sums, judge
        telemetry = self.store.window_telemetry(spec.model, windows.telemetry)
        predictions = self.store.window_predictions(spec.model, windows.predictions)
        return judge_health(spec, r, windows, telemetry, predictions, now)

    def _shadow_gate(self, spec: RolloutSpec, r: Rollout, members: list[RolloutDevice], now: float) -> gates.Verdict:
        shadowing = [m.device for m in members if m.state == "shadowing"]
        h = self.store.shadow_health(spec.model, spec.version, r.wave_started, shadowing)
        return gates.shadow_gate(spec.gates, spec.version, len(shadowing), h, now - r.wave_started >= spec.wave_timeout_s)

    def _abort(self, r: Rollout, reason: str) -> int:
        """Point every moved device back at the version it ran; record why."""
        spec = RolloutSpec.from_json(r.spec)
        back: list[str] = []
        changes: list[DeviceChange] = []
        going: list[tuple[RolloutDevice, Assignment]] = []
        for m in self.store.rollout_devices(r.id):
            if m.state == "rolled_back" or not m.assigned_at:  # never moved (a pending one may have shadowed)
                continue
            if m.previous:
                variant = self._variant_of(spec.model, m.previous, m.variant)
                going.append((m, Assignment(m.device, spec.model, m.previous, variant)))
            else:
                changes.append(DeviceChange(m.device, m.state, "nothing to roll back to (had no version before)"))
        for i in range(0, len(going), self.assign_batch):
            batch = going[i : i + self.assign_batch]
            results = self.director.assign_many([a for _, a in batch], self.image, self.keys)
            for m, _ in batch:
                result = results.get(m.device)
                if isinstance(result, EdgefleetError):
                    changes.append(DeviceChange(m.device, m.state, f"rollback failed: {result}"[:300]))
                elif isinstance(result, Exception):
                    raise result  # as before: only the director's own errors are a device's; the rest is retried next tick
                else:
                    back.append(m.device)
                    changes.append(DeviceChange(m.device, "rolled_back", reason[:300]))
        self.store.set_device_states(r.id, changes)
        self.store.update_rollout(r.id, state=ABORTED, reason=reason)
        if back:
            announce(self.director, back, broker=self.broker)
        logs.event(log, "rollout.aborted", logging.WARNING, id=r.id, reason=reason, rolled_back=len(back))
        return len(back)

    def _variant_of(self, model: str, version: str, preferred: str) -> str:
        """``preferred`` if ``version`` was released with it, else its first variant. The released variants are read
        once per second at most (a wave or a rollback of thousands asks for each device)."""
        key = (model, version)
        cached = self._released.get(key)
        if cached is None or time.monotonic() - cached[0] > 1.0:
            release = self.image.release_of(model, version)
            cached = self._released[key] = (time.monotonic(), [v.id for v in release.variants] if release else [])
        ids = cached[1]
        return preferred if preferred in ids or not ids else ids[0]


# -- judge: pure functions of what a step observed ------------------------------------------------


def applied(members: list[RolloutDevice], changes: list[DeviceChange]) -> list[RolloutDevice]:
    """``members`` as the store will hold them once ``changes`` are written (in order: a later change wins)."""
    last: dict[str, RolloutDevice] = {m.device: m for m in members}
    for c in changes:
        if c.device in last:
            m = last[c.device]
            last[c.device] = replace(
                m, state=c.state, reason=c.reason, assigned_at=m.assigned_at if c.assigned_at is None else c.assigned_at
            )
    return [last[m.device] for m in members]


def judge_reports(seen: Observation) -> list[DeviceChange]:
    """What the wave's assigned devices say: running the new version (active, or shadowing it), or their install failed.

    A device runs the new version when its retained ``reported`` names it, or when its install job on it, since its
    assignment, ended ACTIVE (SHADOW in a shadow phase): the device's own word, published just before that
    ``reported``. Why both: a device that is done never reports again, and its ``reported`` can go missing on the
    controller's side (seen once on a 3-node NATS cluster with a node killed mid-wave: 50 jobs ACTIVE, 48 devices
    counted moved, the wave waiting for the other two until its timeout). Job updates only move forward (the store
    keeps a job's furthest state), so a late or repeated one cannot undo this; a rollback after it is ROLLED_BACK."""
    changes = []
    done = "SHADOW" if seen.shadow else "ACTIVE"
    for m in seen.members:
        d = seen.registry.get(m.device)
        if m.state != "assigned" or d is None:
            continue
        running = d.models.get(seen.spec.model, {})
        reports = (running.get("shadow") or {}) if seen.shadow else running
        job = seen.jobs.get(m.device)
        since = job if job is not None and job.ts >= m.assigned_at - 1 else None
        if reports.get("version") == seen.spec.version or (since and since.state == done):
            changes.append(DeviceChange(m.device, "shadowing" if seen.shadow else "active"))
        elif since and since.state in ("REJECTED", "FAILED"):
            changes.append(DeviceChange(m.device, "failed", f"{since.state}: {since.reason}"[:300]))
    return changes


def judge_budget(spec: RolloutSpec, everyone: list[RolloutDevice], now: float) -> int:
    """How many devices may still move this minute (``max_per_minute``, over the whole rollout)."""
    if spec.max_per_minute <= 0:
        return 1 << 30
    recent = sum(1 for m in everyone if m.assigned_at and now - m.assigned_at < 60)
    return max(0, spec.max_per_minute - recent)


def judge_pending(seen: Observation, members: list[RolloutDevice], now: float) -> list[tuple[RolloutDevice, str]]:
    """The wave's pending devices in order, each with what to do: "assign" (online), "timeout" (offline past the
    wave timeout) or "wait". The step acts on them in this order while its rate budget lasts."""
    out = []
    waited_out = now - seen.rollout.wave_started > seen.spec.wave_timeout_s
    for m in members:
        if m.state != "pending":
            continue
        d = seen.registry.get(m.device)
        online = d is not None and d.online
        out.append((m, "assign" if online else "timeout" if waited_out else "wait"))
    return out


def mark_told(announced: dict[str, Told], devices: list[str], now: float, again: bool) -> None:
    """Note that ``devices`` were announced to at ``now``: ``again``, once more since their move (the backoff grows);
    else just moved (it starts over: a device moved again after a shadow phase is told as soon as a new one)."""
    for device in devices:
        before = announced.get(device)
        announced[device] = Told(now, before.times + 1 if again and before else 2 if again else 1)


def judge_assigned(
    seen: Observation, members: list[RolloutDevice], moved: set[str], announced: Mapping[str, Told], now: float, again_s: float
) -> tuple[list[DeviceChange], list[str]]:
    """The wave's assigned devices: silent for the whole wave (timeout), or told long enough ago to be told again
    (the retained announcement may have been lost on the way: ``again_s`` after the first time, then backing off,
    ``Told``); ``moved`` were told just now. A device this engine never told (a controller that took over) was told
    at its assignment. Silence counts from the later of the last telling and the last word of the device's install
    job on the new version: a device whose job keeps reporting got the announcement and is working on it (a long
    download), while one whose job stalled (its repository went away mid-download) is told again, which makes it
    try at once rather than at its own backoff."""
    changes, again = [], []
    r = seen.rollout
    for m in members:
        if m.state != "assigned":
            continue
        told = announced.get(m.device, Told(m.assigned_at, 1))
        job = seen.jobs.get(m.device)
        if job is not None and job.ts > told.at:
            told = Told(job.ts, told.times)
        if now - r.wave_started > seen.spec.wave_timeout_s:  # assigned but silent for the whole wave
            changes.append(DeviceChange(m.device, "timeout", "no report within the wave timeout"))
        elif m.device not in moved and now > told.again_after(again_s):
            again.append(m.device)
    return changes, again


def judge_silent(spec: RolloutSpec, moved: list[RolloutDevice], reported: Mapping[str, float]) -> gates.Verdict | None:
    """WAIT while a moved device has not reported on the new version since its move (``reported``: each device's newest
    report on it, within the gate's window), as ``gates.health_gate`` would say on the full rows; None: judge them.
    Why apart: while a wave waits for its last devices, the step asks only this (one aggregate query per tick),
    not every moved and unmoved device's rows."""
    silent = sum(1 for m in moved if reported.get(m.device, -1.0) < m.assigned_at)
    if silent:
        return gates.Verdict(gates.WAIT, f"{silent} of {len(moved)} devices have not reported on {spec.version} yet")
    return None


@dataclass(frozen=True)
class HealthWindows:
    """What the health gate reads: each moved device before and after its move (``moved``: the device, the version
    it ran, and its move time), and the unmoved control split at each move time (``control``). ``telemetry`` holds
    every window; ``predictions`` the moved devices' only (the control is judged on latency and errors alone)."""

    moved: list[tuple[RolloutDevice, float, Window, Window]]
    control: dict[float, list[tuple[RolloutDevice, Window, Window]]]
    telemetry: list[Window]
    predictions: list[Window]


def health_windows(spec: RolloutSpec, moved: list[RolloutDevice], unmoved: list[RolloutDevice], now: float) -> HealthWindows:
    """Plan the health gate's reads: the windows to sum, split at each move time (one per step that moved devices)."""
    b = spec.gates.baseline_s

    def around(device: str, before: str, after: str, split: float) -> tuple[Window, Window]:
        return Window(device, before, split - b, split), Window(device, after, split, now + 1)

    subjects = [(m, m.assigned_at, *around(m.device, m.previous, spec.version, m.assigned_at)) for m in moved]
    control = {split: [(c, *around(c.device, c.previous, c.previous, split)) for c in unmoved] for split in {m.assigned_at for m in moved}}
    predictions = [w for _, _, before, after in subjects for w in (before, after)]
    telemetry = predictions + [w for group in control.values() for _, before, after in group for w in (before, after)]
    return HealthWindows(subjects, control, telemetry, predictions)


def judge_health(
    spec: RolloutSpec,
    r: Rollout,
    plan: HealthWindows,
    telemetry: Mapping[Window, WindowTelemetry],
    predictions: Mapping[Window, WindowPredictions],
    now: float,
) -> gates.Verdict:
    """The health gate on the wave's devices (each before and after its move) and the unmoved control over the same
    windows, from the sums the store made of ``plan``'s windows."""

    def stats(w: Window) -> DeviceStats:
        return DeviceStats.of(telemetry.get(w), predictions.get(w))

    controls = {
        split: [gates.Subject(c.device, c.hardware, stats(before), stats(after)) for c, before, after in group]
        for split, group in plan.control.items()
    }
    return gates.health_gate(
        spec.gates,
        spec.version,
        [gates.Subject(m.device, m.hardware, stats(before), stats(after)) for m, _, before, after in plan.moved],
        {m.device: controls[split] for m, split, _, _ in plan.moved},
        now - r.wave_started >= spec.wave_timeout_s,
    )
