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
(``agent.predictions``); the health gate compares the wave's distribution on the new
version with the rest of the fleet's on the old one (top-class shift, mean shift).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from agent import logs
from agent.errors import EdgefleetError
from fleet.controller import announce
from fleet.director import Director
from fleet.image_repo import ImageRepository, variant_target_path
from fleet.keys import KeyStore
from fleet.store import Device, FleetStore

__all__ = ["Gates", "RolloutEngine", "RolloutError", "RolloutSpec", "matches", "parse_selector", "parse_waves", "pick_variant"]

log = logging.getLogger("edgefleet.rollout")

RUNNING, PAUSED, DONE, ABORTED, ABORTING = "running", "paused", "done", "aborted", "aborting"
SHADOW = "shadow"  # the rollout's phase while its first wave runs the new version in shadow
SETTLED = {"active", "shadowing", "failed", "timeout"}


class RolloutError(EdgefleetError):
    code = "bad_rollout"


@dataclass
class Gates:
    max_failed: str = "0"  # failed+rejected devices per wave before abort: a count ("2") or a share ("10%")
    max_error_rate_increase: float = 0.05  # new version's error rate minus the old one's
    max_p95_ratio: float = 2.0  # new version's p95 latency / the old one's
    p95_floor_ms: float = 1.0  # a p95 this little above the old one never aborts: sub-ms timings on a busy CPU are noise
    min_requests: int = 0  # below this many answers on the new version the health gate waits (until wave_timeout)
    # prediction drift (devices that publish prediction sums); None: not checked
    max_class_shift: float | None = None  # total variation distance of the top-class distribution, 0..1
    max_mean_shift: float | None = None  # mean output moved by this many of the old version's standard deviations
    # shadow mode
    min_agreement: float | None = 0.95  # share of live inputs on which the shadow's answer agrees
    max_shadow_diff: float | None = None  # mean absolute difference of the outputs
    shadow_min_compared: int = 100  # live inputs compared before judging (waits until wave_timeout, then aborts)


@dataclass
class RolloutSpec:
    model: str
    version: str
    selector: str = ""
    waves: list[str] = field(default_factory=lambda: ["100%"])
    variant: str | None = None  # None: each device gets the variant its runtimes prefer
    max_per_minute: int = 0  # 0: no limit
    soak_s: float = 0.0
    wave_timeout_s: float = 600.0  # offline devices are retried until then, then counted as timeout
    gates: Gates = field(default_factory=Gates)
    shadow: bool = False  # the first wave runs the new version in shadow, judged by the shadow gate, before switching

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutSpec:
        return cls(**{**data, "gates": Gates(**data.get("gates", {}))})


def parse_selector(text: str) -> list[tuple[str, str]]:
    """``hw=jetson,tag:site=berlin,model=mlp@1.0.0,device=cam-*`` → [(key, value)]; every term must hold.

    hw: a substring of the reported hardware; runtime: an installed runtime; model: runs that model
    (at that version); device: the id or a glob; tag:KEY: a tag set with `fleet tag`.
    """
    terms = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.partition("=")
        if not sep or not value or not (key in ("hw", "runtime", "model", "device") or (key.startswith("tag:") and len(key) > 4)):
            raise RolloutError(f"bad selector term {term!r}: use hw=, runtime=, model=NAME[@VERSION], device=, tag:KEY=")
        terms.append((key, value))
    return terms


def matches(device: Device, terms: list[tuple[str, str]]) -> bool:
    for key, value in terms:
        if key == "hw" and value.lower() not in device.hardware.lower():
            return False
        if key == "runtime" and value not in device.runtimes:
            return False
        if key == "device" and not fnmatch.fnmatchcase(device.id, value):
            return False
        if key == "model":
            name, _, version = value.partition("@")
            m = device.models.get(name)
            if m is None or (version and m.get("version") != version):
                return False
        if key.startswith("tag:") and device.tags.get(key[4:]) != value:
            return False
    return True


def parse_waves(text: str | list[str]) -> list[str]:
    """``1%,10%,50%,100%`` or counts ``5,50,all``: cumulative, increasing, the last covering everyone."""
    items = [w.strip() for w in (text.split(",") if isinstance(text, str) else text) if w.strip()]
    if not items:
        raise RolloutError("no waves given")
    percent = all(w.endswith("%") for w in items)
    if not percent and any(w.endswith("%") for w in items):
        raise RolloutError(f"waves {','.join(items)}: all percentages (1%,10%,100%) or all counts (5,50,all)")
    previous = 0.0
    for w in items:
        try:
            value = float("inf") if w == "all" else float(w[:-1]) if percent else float(int(w))
        except ValueError:
            raise RolloutError(f"bad wave {w!r}: a percentage (10%), a count (50) or 'all'") from None
        if value <= previous or (percent and value > 100):
            raise RolloutError(f"bad wave {w!r}: each wave larger than the one before, up to 100% or 'all'")
        previous = value
    if items[-1] not in ("100%", "all"):
        items.append("100%")
    return items


def _cut(waves: list[str], n: int) -> list[int]:
    """Cumulative device counts per wave for ``n`` devices (each wave gets at least one while devices remain)."""
    out, done = [], 0
    for w in waves:
        target = n if w in ("all", "100%") else round(n * float(w[:-1]) / 100) if w.endswith("%") else min(n, int(w))
        target = max(target, min(n, done + 1))
        out.append(target)
        done = target
    return out


PREFERENCE = {
    "tensorrt": ["onnx-fp32", "onnx-int8"],  # the agent builds its TensorRT engine from the ONNX variant
    "openvino": ["openvino-fp16", "openvino-fp32", "openvino-int8"],
    "litert": ["tflite-fp32", "tflite-int8"],
    "onnx": ["onnx-fp32", "onnx-int8"],
}


def pick_variant(available: list[str], device: Device) -> str:
    """The first variant of the device's own preference (``reported.preferred_variants``) that the release has;
    for a device that does not say (the simulator, older agents), by its runtimes."""
    for v in device.preferred_variants:
        if v in available:
            return v
    for runtime in ("tensorrt", "openvino", "litert", "onnx"):
        if runtime in device.runtimes:
            for v in PREFERENCE[runtime]:
                if v in available:
                    return v
    return next((v for v in ("onnx-fp32", "onnx-int8") if v in available), available[0])


class RolloutEngine:
    def __init__(self, store: FleetStore, image: ImageRepository, director: Director, keys: KeyStore, host: str, port: int) -> None:
        self.store, self.image, self.director, self.keys, self.host, self.port = store, image, director, keys, host, port
        self.reannounce_s = 10.0  # a device assigned but silent this long is told again (a lost announcement)
        self._announced: dict[tuple[int, str], float] = {}

    # -- commands ---------------------------------------------------------------------------

    def start(self, spec: RolloutSpec) -> int:
        release = self.image.release_of(spec.model, spec.version)
        if release is None:
            raise RolloutError(f"{spec.model} {spec.version} is not released")
        available = [v.id for v in release.variants]
        if spec.variant is not None and spec.variant not in available:
            raise RolloutError(f"{spec.model} {spec.version} has no variant {spec.variant!r} (it has {', '.join(available)})")
        terms = parse_selector(spec.selector)
        spec.waves = parse_waves(spec.waves)
        _ = _share(spec.gates.max_failed, 1)  # validates
        chosen = [d for d in self.store.devices() if matches(d, terms)]
        if not chosen:
            raise RolloutError(f"no registered device matches {spec.selector or '(everything)'}")
        busy = {r["spec"]["model"] for r in self.store.rollouts() if r["state"] in (RUNNING, PAUSED, ABORTING)}
        if spec.model in busy:
            raise RolloutError(f"a rollout of {spec.model} is already running: abort or finish it first")
        chosen.sort(key=lambda d: d.id)
        cuts, start, waves = _cut(spec.waves, len(chosen)), 0, []
        for end in cuts:
            members = chosen[start:end]
            waves.append(
                [(d.id, str(d.models.get(spec.model, {}).get("version", "")), spec.variant or pick_variant(available, d)) for d in members]
            )
            start = end
        if spec.shadow:
            for device, previous, _ in waves[0]:
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
            if r["state"] == ABORTING:
                self._abort(r, r["reason"] or "aborted by the operator")
            elif r["state"] == RUNNING:
                try:
                    self._step(r, now or time.time())
                except EdgefleetError as exc:
                    logs.event(log, "rollout.step_failed", logging.ERROR, id=r["id"], reason=str(exc))

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
        if failed > _share(spec.gates.max_failed, len(members)):
            self.store.set_device_states(rid, changes)
            self._abort(r, f"install gate: {failed} of {len(members)} devices in wave {wave + 1} failed to install")
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
            if shadow:  # keep serving what it runs (those exact bytes: its own variant), the new version beside it
                serving_variant = self._variant_of(spec.model, m["previous"], str(d.models.get(spec.model, {}).get("variant", "")))
                candidate = (spec.version, m["variant"])
                self.director.assign(m["device"], self.image, spec.model, m["previous"], serving_variant, self.keys, shadow=candidate)
            else:
                self.director.assign(m["device"], self.image, spec.model, spec.version, m["variant"], self.keys)
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
            announce(self.director, moved, self.host, self.port)
        if not all(m["state"] in SETTLED for m in members):
            return
        if not r["wave_done"]:
            self.store.update_rollout(rid, wave_done=now)
            r["wave_done"] = now
        if now - r["wave_done"] < spec.soak_s:
            return
        verdict = self._shadow_gate(spec, r, members, now) if shadow else self._health_gate(rid, spec, r, now)
        if verdict == "wait":
            return
        if verdict:
            self._abort(r, verdict)
            return
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

    def _budget(self, rid: int, spec: RolloutSpec, now: float) -> int:
        if spec.max_per_minute <= 0:
            return 1 << 30
        recent = sum(1 for m in self.store.rollout_devices(rid) if m["assigned_at"] and now - m["assigned_at"] < 60)
        return max(0, spec.max_per_minute - recent)

    def _health_gate(self, rid: int, spec: RolloutSpec, r: dict[str, Any], now: float) -> str:
        """'' to go on, 'wait' for more data, or why to abort."""
        moved = [m for m in self.store.rollout_devices(rid) if m["state"] == "active"]
        if not moved:
            return ""
        since = r["wave_done"] - max(spec.soak_s, 0.0) if spec.soak_s else r["wave_started"]
        new = self.store.health(spec.model, spec.version, since, [m["device"] for m in moved])
        if new.requests + new.errors < spec.gates.min_requests:
            return "wait" if now - r["wave_started"] < spec.wave_timeout_s else ""
        previous = {m["previous"] for m in moved if m["previous"]}
        olds = [self.store.health(spec.model, v, since) for v in previous]
        old_requests = sum(o.requests for o in olds)
        old_errors = sum(o.errors for o in olds)
        old_rate = old_errors / (old_requests + old_errors) if old_requests + old_errors else 0.0
        old_p95 = sorted(o.p95_ms for o in olds if o.p95_ms is not None)
        if new.error_rate - old_rate > spec.gates.max_error_rate_increase:
            return f"health gate: error rate {new.error_rate:.1%} on {spec.version} against {old_rate:.1%} before"
        if new.p95_ms is not None and old_p95:
            before = old_p95[len(old_p95) // 2]
            ratio = new.p95_ms / max(before, 1e-6)
            if ratio > spec.gates.max_p95_ratio and new.p95_ms - before > spec.gates.p95_floor_ms:
                return f"health gate: p95 latency {ratio:.1f}x the previous version's (limit {spec.gates.max_p95_ratio:g}x)"
        return self._drift_gate(spec, since, [m["device"] for m in moved], previous)

    def _drift_gate(self, spec: RolloutSpec, since: float, moved: list[str], previous: set[str]) -> str:
        """The new version's answers on the moved devices against the old version's on the rest of the fleet.

        Skipped when no threshold is set or either side published no prediction sums; against several old
        versions, the one with the most answers in the window is the baseline.
        """
        g = spec.gates
        if (g.max_class_shift is None and g.max_mean_shift is None) or not previous:
            return ""
        new = self.store.distribution(spec.model, spec.version, since, moved)
        olds = {v: self.store.distribution(spec.model, v, since) for v in sorted(previous)}
        base, old = max(olds.items(), key=lambda kv: kv[1].rows)
        if not new.rows or not old.rows:
            return ""
        shift = new.class_shift(old)
        if g.max_class_shift is not None and shift is not None and shift > g.max_class_shift:
            return (
                f"health gate: prediction drift: {shift:.1%} of answers moved top class against {base}"
                f" ({new.rows} answers on {spec.version}; limit {g.max_class_shift:.1%})"
            )
        mean_shift = new.mean_shift(old)
        if g.max_mean_shift is not None and mean_shift is not None and mean_shift > g.max_mean_shift:
            return (
                f"health gate: prediction drift: mean output moved {mean_shift:.2f} standard deviations from {base}'s"
                f" (limit {g.max_mean_shift:g})"
            )
        return ""

    def _shadow_gate(self, spec: RolloutSpec, r: dict[str, Any], members: list[dict[str, Any]], now: float) -> str:
        """'' to switch the wave, 'wait' for more comparisons, or why to abort before any device switched."""
        g = spec.gates
        shadowing = [m["device"] for m in members if m["state"] == "shadowing"]
        if not shadowing:
            return "shadow gate: no device of the first wave ran the shadow"
        h = self.store.shadow_health(spec.model, spec.version, r["wave_started"], shadowing)
        if h.compared < g.shadow_min_compared:
            if now - r["wave_started"] < spec.wave_timeout_s:
                return "wait"
            return f"shadow gate: only {h.compared} live inputs compared within the wave timeout (need {g.shadow_min_compared})"
        if h.errors / (h.errors + h.compared) > g.max_error_rate_increase:
            return f"shadow gate: {spec.version} failed {h.errors} calls in shadow against {h.compared} compared"
        agreement = h.agreement or 0.0
        if g.min_agreement is not None and agreement < g.min_agreement:
            return (
                f"shadow gate: {spec.version} agreed with the serving version on {agreement:.1%} of {h.compared} live inputs"
                f" (need {g.min_agreement:.1%})"
            )
        if g.max_shadow_diff is not None and h.mean_abs_diff is not None and h.mean_abs_diff > g.max_shadow_diff:
            return f"shadow gate: mean absolute difference {h.mean_abs_diff:.4g} from the serving version (limit {g.max_shadow_diff:g})"
        if h.p95_ms is not None and h.active_p95_ms:
            ratio = h.p95_ms / max(h.active_p95_ms, 1e-6)
            if ratio > g.max_p95_ratio and h.p95_ms - h.active_p95_ms > g.p95_floor_ms:
                return f"shadow gate: p95 latency in shadow {ratio:.1f}x the serving version's (limit {g.max_p95_ratio:g}x)"
        logs.event(log, "rollout.shadow_gate", id=r["id"], compared=h.compared, agreement=f"{agreement:.4f}", devices=h.devices)
        return ""

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
            announce(self.director, back, self.host, self.port)
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


def _share(limit: str, n: int) -> int:
    try:
        return int(n * float(limit[:-1]) / 100) if limit.endswith("%") else int(limit)
    except ValueError:
        raise RolloutError(f"bad failure limit {limit!r}: a count (2) or a share (10%)") from None
