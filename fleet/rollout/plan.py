"""A rollout's plan: which devices (selector), in which waves, with which variant each. Pure: reads nothing, moves nothing.

Why apart from the engine: planning decides, executing acts (balena-supervisor's split). The
engine hands this module the registry's devices and the release's variants and stores the
plan it gets back (``PlannedDevice`` per device, per wave) before any device is touched.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from agent.runtimes import runtime_classes
from fleet.rollout.spec import RolloutError, RolloutSpec
from fleet.store import Device, PlannedDevice

__all__ = ["cut", "matches", "parse_selector", "parse_waves", "pick_variant", "plan", "select"]


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


def cut(waves: list[str], n: int) -> list[int]:
    """Cumulative device counts per wave for ``n`` devices (each wave gets at least one while devices remain)."""
    out, done = [], 0
    for w in waves:
        target = n if w in ("all", "100%") else round(n * float(w[:-1]) / 100) if w.endswith("%") else min(n, int(w))
        target = max(target, min(n, done + 1))
        out.append(target)
        done = target
    return out


def pick_variant(available: list[str], device: Device) -> str:
    """The first variant of the device's own preference (``reported.preferred_variants``) that the release has;
    for a device that does not say (the simulator, older agents), by its runtimes, as each runtime's file
    declares (``Runtime.variants``, tried in ``Runtime.fleet_order``), then the universal runtime's variants."""
    for v in device.preferred_variants:
        if v in available:
            return v
    classes = sorted(runtime_classes().values(), key=lambda cls: cls.fleet_order)
    for cls in classes:
        if cls.name in device.runtimes:
            for v in cls.variants:
                if v in available:
                    return v
    last_resort = [v for cls in classes if cls.universal for v in cls.variants]
    return next((v for v in last_resort if v in available), available[0])


def select(devices: Iterable[Device], terms: list[tuple[str, str]], selector: str) -> list[Device]:
    """The devices every term of the (parsed) selector holds for, by id; RolloutError when there are none."""
    chosen = sorted((d for d in devices if matches(d, terms)), key=lambda d: d.id)
    if not chosen:
        raise RolloutError(f"no registered device matches {selector or '(everything)'}")
    return chosen


def plan(spec: RolloutSpec, chosen: list[Device], available: list[str]) -> list[list[PlannedDevice]]:
    """``chosen`` (in order) cut into the spec's waves: each device with the version it runs now, the variant it gets
    (the spec's, else ``pick_variant``) and its hardware. With ``spec.shadow``, the first wave must run an older version."""
    cuts, start, waves = cut(spec.waves, len(chosen)), 0, []
    for end in cuts:
        waves.append(
            [
                PlannedDevice(
                    d.id, str(d.models.get(spec.model, {}).get("version", "")), spec.variant or pick_variant(available, d), d.hardware
                )
                for d in chosen[start:end]
            ]
        )
        start = end
    if spec.shadow:
        for m in waves[0]:
            if not m.previous:
                raise RolloutError(f"--shadow: {m.device} runs no version of {spec.model}, so nothing to compare the shadow with")
            if m.previous == spec.version:
                raise RolloutError(f"--shadow: {m.device} runs {spec.model} {spec.version} already")
    return waves
