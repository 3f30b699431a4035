"""Wave rollouts that stop by themselves: on failed installs, and on a new version that behaves worse.

The rollout lives in the store (``FleetStore``): its spec, the current wave, when the
wave started and finished, and every device's state. ``RolloutEngine.tick()`` reads it,
moves it one step and writes it back, so a controller killed and restarted goes on
exactly where it was. Moving a device means pointing its director metadata at the
release (``Director.assign``) and announcing it; rolling back points it at the version
it ran before (a version the device keeps, which the agent accepts although its
release counter is lower).

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
from collections import defaultdict
from typing import Any

from agent import logs
from agent.errors import EdgefleetError
from agent.settings import BrokerSettings
from fleet.controller import announce
from fleet.rollout import gates
from fleet.rollout.spec import RolloutError, RolloutSpec, cut, matches, parse_selector, parse_waves, pick_variant, share
from fleet.rollout.stats import device_stats
from fleet.store import FleetStore, PredictionRow, TelemetryRow
from fleet.transport import client as transport
from fleet.tuf.director import Director
from fleet.tuf.image_repo import ImageRepository, variant_target_path
from fleet.tuf.keys import KeyStore

__all__ = ["RolloutEngine"]

log = logging.getLogger("edgefleet.rollout")

RUNNING, PAUSED, DONE, ABORTED, ABORTING = "running", "paused", "done", "aborted", "aborting"
SHADOW = "shadow"  # the rollout's phase while its first wave runs the new version in shadow
SETTLED = {"active", "shadowing", "failed", "timeout"}


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
        self.reannounce_s = 10.0  # a device assigned but silent this long is told again (a lost announcement)
        self._announced: dict[tuple[int, str], float] = {}

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
        release = self.image.release_of(spec.model, spec.version)
        if release is None:
            self.image.ensure_not_revoked(spec.model, spec.version)  # ReleaseRevoked: the clearer error
            raise RolloutError(f"{spec.model} {spec.version} is not released")
        available = [v.id for v in release.variants]
        if spec.variant is not None and spec.variant not in available:
            raise RolloutError(f"{spec.model} {spec.version} has no variant {spec.variant!r} (it has {', '.join(available)})")
        terms = parse_selector(spec.selector)
        spec.waves = parse_waves(spec.waves)
        share(spec.gates.max_failed, 1)  # validates
        share(spec.gates.max_regressed, 1)
        if spec.gates.min_control < 3:
            raise RolloutError("--min-control must be at least 3: a median of fewer devices is one device's claim")
        chosen = [d for d in self.store.devices() if matches(d, terms)]
        if not chosen:
            raise RolloutError(f"no registered device matches {spec.selector or '(everything)'}")
        busy = {r["spec"]["model"] for r in self.store.rollouts() if r["state"] in (RUNNING, PAUSED, ABORTING)}
        if spec.model in busy:
            raise RolloutError(f"a rollout of {spec.model} is already running: abort or finish it first")
        chosen.sort(key=lambda d: d.id)
        cuts, start, waves = cut(spec.waves, len(chosen)), 0, []
        for end in cuts:
            members = chosen[start:end]
            waves.append(
                [
                    (d.id, str(d.models.get(spec.model, {}).get("version", "")), spec.variant or pick_variant(available, d), d.hardware)
                    for d in members
                ]
            )
            start = end
        if spec.shadow:
            for device, previous, _, _ in waves[0]:
                if not previous:
                    raise RolloutError(f"--shadow: {device} runs no version of {spec.model}, so nothing to compare the shadow with")
                if previous == spec.version:
                    raise RolloutError(f"--shadow: {device} runs {spec.model} {spec.version} already")
        rid = self.store.create_rollout(spec.to_json(), waves, phase=SHADOW if spec.shadow else "")
        logs.event(log, "rollout.started", id=rid, model=spec.model, version=spec.version, devices=len(chosen), waves=len(waves))
        return rid

    def pause(self, rid: int) -> None:
        self._require(rid, RUNNING)
        self.store.update_rollout(rid, state=PAUSED)

    def resume(self, rid: int) -> None:
        self._require(rid, PAUSED)
        self.store.update_rollout(rid, state=RUNNING)

    def abort(self, rid: int, reason: str = "aborted by the operator") -> int:
        """Roll the moved devices back now; the number of devices pointed back."""
        r = self._require(rid, RUNNING, PAUSED, ABORTING)
        return self._abort(r, reason)

    def request_abort(self, rid: int, reason: str = "aborted by the operator") -> None:
        """For a CLI without the director key: the running controller aborts it on its next tick."""
        self._require(rid, RUNNING, PAUSED)
        self.store.update_rollout(rid, state=ABORTING, reason=reason)

    def _require(self, rid: int, *states: str) -> dict[str, Any]:
        r = self.store.rollout(rid)
        if r is None:
            raise RolloutError(f"no rollout {rid}")
        if r["state"] not in states:
            raise RolloutError(f"rollout {rid} is {r['state']}, not {' or '.join(states)}")
        return r

    # -- the step ---------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Move every running rollout one step."""
        for r in self.store.rollouts():
            try:
                if r["state"] == ABORTING:
                    self._abort(r, r["reason"] or "aborted by the operator")
                elif r["state"] == RUNNING:
                    self._step(r, now or time.time())
            except Exception as exc:  # one rollout's trouble must not stop the others: logged, retried next tick
                logs.event(log, "rollout.step_failed", logging.ERROR, id=r["id"], reason=f"{type(exc).__name__}: {exc}")

    def _step(self, r: dict[str, Any], now: float) -> None:
        rid, spec, wave = r["id"], RolloutSpec.from_json(r["spec"]), r["wave"]
        shadow = r.get("phase") == SHADOW
        target = lambda variant: variant_target_path(spec.model, spec.version, variant)  # noqa: E731
        members = self.store.rollout_devices(rid, wave)
        devices = {d.id: d for d in self.store.devices()}
        changes: list[tuple[str, str, str, float | None]] = []
        # what the devices say
        for m in members:
            d = devices.get(m["device"])
            if m["state"] != "assigned" or d is None:
                continue
            running = d.models.get(spec.model, {})
            reports = (running.get("shadow") or {}) if shadow else running
            if reports.get("version") == spec.version:
                done = "shadowing" if shadow else "active"
                changes.append((m["device"], done, "", None))
                m["state"] = done
                continue
            job = self.store.last_job(m["device"], target(m["variant"]))
            if job and job["state"] in ("REJECTED", "FAILED") and job["ts"] >= m["assigned_at"] - 1:
                changes.append((m["device"], "failed", f"{job['state']}: {job['reason']}"[:300], None))
                m["state"] = "failed"
        # install gate
        failed = sum(1 for m in members if m["state"] == "failed")
        install = gates.install_gate(spec.gates, failed, len(members), wave)
        if install.decision == gates.ABORT:
            self.store.set_device_states(rid, changes)
            self._abort(r, install.reason)
            return
        # move pending devices that are online, within the rate limit
        budget = self._budget(rid, spec, now)
        moved = []
        for m in members:
            if m["state"] != "pending" or budget <= 0:
                continue
            d = devices.get(m["device"])
            if d is None or not d.online:
                if now - r["wave_started"] > spec.wave_timeout_s:
                    changes.append((m["device"], "timeout", "offline for the whole wave", None))
                    m["state"] = "timeout"
                continue
            try:
                self._assign(spec, m, str(d.models.get(spec.model, {}).get("variant", "")), shadow)
            except Exception as exc:  # one device that cannot be assigned (bad id, signing error) fails alone
                changes.append((m["device"], "failed", f"could not assign: {type(exc).__name__}: {exc}"[:300], None))
                m["state"] = "failed"
                logs.event(log, "rollout.assign_failed", logging.ERROR, id=rid, device=m["device"][:80], reason=str(exc)[:200])
                continue
            moved.append(m["device"])
            changes.append((m["device"], "assigned", "", now))
            m["state"] = "assigned"
            budget -= 1
        for m in members:
            if m["state"] != "assigned":
                continue
            if now - r["wave_started"] > spec.wave_timeout_s:  # assigned but silent for the whole wave
                changes.append((m["device"], "timeout", "no report within the wave timeout", None))
                m["state"] = "timeout"
            elif m["device"] not in moved and now - self._announced.get((rid, m["device"]), m["assigned_at"]) > self.reannounce_s:
                moved.append(m["device"])  # the retained announcement may have been lost on the way: say it again
        for device in moved:
            self._announced[(rid, device)] = now
        self.store.set_device_states(rid, changes)
        if moved:
            announce(self.director, moved, broker=self.broker)
        if not all(m["state"] in SETTLED for m in members):
            return
        if not r["wave_done"]:
            self.store.update_rollout(rid, wave_done=now)
            r["wave_done"] = now
        if now - r["wave_done"] < spec.soak_s:
            return
        verdict = self._shadow_gate(spec, r, members, now) if shadow else self._health_gate(rid, spec, r, now)
        if verdict.decision == gates.WAIT:
            return
        if verdict.decision == gates.ABORT:
            self._abort(r, verdict.reason)
            return
        logs.event(log, "rollout.gate_passed", id=rid, wave=wave + 1, phase=r.get("phase") or "health", detail=verdict.reason)
        if shadow:  # the shadow convinced: the same wave now switches for real
            back: list[tuple[str, str, str, float | None]] = [
                (m["device"], "pending", "shadow gate passed", None) for m in members if m["state"] == "shadowing"
            ]
            self.store.set_device_states(rid, back)
            self.store.update_rollout(rid, phase="", wave_started=now, wave_done=0)
            logs.event(log, "rollout.shadow_passed", id=rid, devices=len(back))
            return
        last = len(spec.waves) - 1
        if wave >= last or not self.store.rollout_devices(rid, wave + 1):
            self.store.update_rollout(rid, state=DONE, reason="every wave done")
            logs.event(log, "rollout.done", id=rid)
        else:
            self.store.update_rollout(rid, wave=wave + 1, wave_started=now, wave_done=0)
            logs.event(log, "rollout.wave", id=rid, wave=wave + 2)

    def _assign(self, spec: RolloutSpec, m: dict[str, Any], serving_variant: str, shadow: bool) -> None:
        if shadow:  # keep serving what it runs (those exact bytes: its own variant), the new version beside it
            variant = self._variant_of(spec.model, m["previous"], serving_variant)
            candidate = (spec.version, m["variant"])
            self.director.assign(m["device"], self.image, spec.model, m["previous"], variant, self.keys, shadow=candidate)
        else:
            self.director.assign(m["device"], self.image, spec.model, spec.version, m["variant"], self.keys)

    def _budget(self, rid: int, spec: RolloutSpec, now: float) -> int:
        if spec.max_per_minute <= 0:
            return 1 << 30
        recent = sum(1 for m in self.store.rollout_devices(rid) if m["assigned_at"] and now - m["assigned_at"] < 60)
        return max(0, spec.max_per_minute - recent)

    def _health_gate(self, rid: int, spec: RolloutSpec, r: dict[str, Any], now: float) -> gates.Verdict:
        """Observe the wave's devices (each before and after its move) and the unmoved control over the same
        windows, then judge (gates.py)."""
        everyone = self.store.rollout_devices(rid)
        moved = [m for m in everyone if m["state"] == "active" and m["wave"] == r["wave"]]
        unmoved = [m for m in everyone if m["state"] == "pending" and m["previous"]]
        if not moved:
            return gates.Verdict(gates.GO, "no device of the wave moved")
        b = spec.gates.baseline_s
        ids = [m["device"] for m in moved + unmoved]
        since = min(m["assigned_at"] for m in moved) - b
        telemetry = _by_device(self.store.telemetry_rows(spec.model, ids, since))
        predictions = _by_device(self.store.prediction_rows(spec.model, ids, since))

        def subject(m: dict[str, Any], version: str, split: float) -> gates.Subject:
            t, p = telemetry.get(m["device"], []), predictions.get(m["device"], [])
            before = device_stats(t, p, m["previous"], split - b, split)
            after = device_stats(t, p, version, split, now + 1)
            return gates.Subject(m["device"], m["hardware"], before, after)

        controls: dict[float, list[gates.Subject]] = {}  # per move time: the unmoved devices split at that moment
        for m in moved:
            if m["assigned_at"] not in controls:
                controls[m["assigned_at"]] = [subject(c, c["previous"], m["assigned_at"]) for c in unmoved]
        return gates.health_gate(
            spec.gates,
            spec.version,
            [subject(m, spec.version, m["assigned_at"]) for m in moved],
            {m["device"]: controls[m["assigned_at"]] for m in moved},
            now - r["wave_started"] >= spec.wave_timeout_s,
        )

    def _shadow_gate(self, spec: RolloutSpec, r: dict[str, Any], members: list[dict[str, Any]], now: float) -> gates.Verdict:
        shadowing = [m["device"] for m in members if m["state"] == "shadowing"]
        h = self.store.shadow_health(spec.model, spec.version, r["wave_started"], shadowing)
        return gates.shadow_gate(spec.gates, spec.version, len(shadowing), h, now - r["wave_started"] >= spec.wave_timeout_s)

    def _abort(self, r: dict[str, Any], reason: str) -> int:
        """Point every moved device back at the version it ran; record why."""
        rid, spec = r["id"], RolloutSpec.from_json(r["spec"])
        back: list[str] = []
        changes: list[tuple[str, str, str, float | None]] = []
        for m in self.store.rollout_devices(rid):
            if m["state"] == "rolled_back" or not m["assigned_at"]:  # never moved (a pending one may have shadowed)
                continue
            if m["previous"]:
                variant = self._variant_of(spec.model, m["previous"], m["variant"])
                try:
                    self.director.assign(m["device"], self.image, spec.model, m["previous"], variant, self.keys)
                    back.append(m["device"])
                    changes.append((m["device"], "rolled_back", reason[:300], None))
                except EdgefleetError as exc:
                    changes.append((m["device"], m["state"], f"rollback failed: {exc}"[:300], None))
            else:
                changes.append((m["device"], m["state"], "nothing to roll back to (had no version before)", None))
        self.store.set_device_states(rid, changes)
        self.store.update_rollout(rid, state=ABORTED, reason=reason)
        if back:
            announce(self.director, back, broker=self.broker)
        logs.event(log, "rollout.aborted", logging.WARNING, id=rid, reason=reason, rolled_back=len(back))
        return len(back)

    def _variant_of(self, model: str, version: str, preferred: str) -> str:
        release = self.image.release_of(model, version)
        ids = [v.id for v in release.variants] if release else []
        return preferred if preferred in ids or not ids else ids[0]

    def progress(self, rid: int) -> dict[str, Any]:
        r = self._require(rid, RUNNING, PAUSED, DONE, ABORTED, ABORTING)
        waves: dict[int, dict[str, int]] = {}
        for m in self.store.rollout_devices(rid):
            w = waves.setdefault(m["wave"], {})
            w[m["state"]] = w.get(m["state"], 0) + 1
        return {**r, "waves": [waves[k] for k in sorted(waves)]}


def _by_device(rows: list[TelemetryRow] | list[PredictionRow]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        out[row.device].append(row)
    return out
