"""What a rollout is: which devices (selector), in which waves, with which variant, judged by which gates.

Pure data and parsing; nothing here talks to the store or the broker.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.errors import EdgefleetError
from agent.runtimes import runtime_classes
from fleet.store import Device

__all__ = ["Gates", "RolloutError", "RolloutSpec", "cut", "matches", "parse_selector", "parse_waves", "pick_variant", "share"]


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
    # per-device judgement (fleet/rollout/gates.py): each moved device against itself before it moved
    max_regressed: str = "10%"  # devices of a wave that may regress before it aborts: a count ("2") or a share ("10%"), floor
    min_device_requests: int = 20  # answers+errors a device needs on each side (before, after) to be judged on its own
    baseline_s: float = 600.0  # how far back before its move a device's own baseline reaches
    min_control: int = 3  # devices not yet moved needed to correct for fleet-wide load (per hardware class where there are enough)


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


def share(limit: str, n: int) -> int:
    try:
        return int(n * float(limit[:-1]) / 100) if limit.endswith("%") else int(limit)
    except ValueError:
        raise RolloutError(f"bad failure limit {limit!r}: a count (2) or a share (10%)") from None
