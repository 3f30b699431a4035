"""What a rollout is: the operator's request (model, version, selector, waves, variant, limits) and its gates.

Pure data, kept as JSON in the store (``to_json``/``from_json``); turning it into devices and waves
is ``fleet.rollout.plan``'s, judging a wave ``fleet.rollout.gates``'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from agent.errors import EdgefleetError

__all__ = ["SOAK_S", "WAVE_TIMEOUT_S", "Gates", "RolloutError", "RolloutSpec", "share"]


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

    def validate(self) -> None:
        """RolloutError for limits no gate can use; called before a rollout starts, so a bad one never starts."""
        share(self.max_failed, 1)
        share(self.max_regressed, 1)
        if self.min_control < 3:
            raise RolloutError("--min-control must be at least 3: a median of fewer devices is one device's claim")


SOAK_S = 300.0  # each wave runs this long before the health gate judges it: long enough for a telemetry window or ten
WAVE_TIMEOUT_S = 1800.0  # offline devices are waited for this long, then counted as timed out


@dataclass
class RolloutSpec:
    model: str
    version: str
    selector: str = ""
    waves: list[str] = field(default_factory=lambda: ["100%"])
    variant: str | None = None  # None: each device gets the variant its runtimes prefer
    max_per_minute: int = 0  # 0: no limit
    soak_s: float = SOAK_S
    wave_timeout_s: float = WAVE_TIMEOUT_S  # offline devices are retried until then, then counted as timeout
    gates: Gates = field(default_factory=Gates)
    shadow: bool = False  # the first wave runs the new version in shadow, judged by the shadow gate, before switching

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutSpec:
        return cls(**{**data, "gates": Gates(**data.get("gates", {}))})


def share(limit: str, n: int) -> int:
    """A gate's limit (``max_failed``, ``max_regressed``) for ``n`` devices: a count ("2") or a floored share ("10%")."""
    try:
        return int(n * float(limit[:-1]) / 100) if limit.endswith("%") else int(limit)
    except ValueError:
        raise RolloutError(f"bad failure limit {limit!r}: a count (2) or a share (10%)") from None
