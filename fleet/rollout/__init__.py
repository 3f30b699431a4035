"""Wave rollouts: spec (what and where), stats (a device's numbers), gates (pure judgement), engine (observe → judge → act)."""

from fleet.rollout.engine import ABORTED, DONE, PAUSED, RUNNING, RolloutEngine
from fleet.rollout.gates import Verdict
from fleet.rollout.spec import Gates, RolloutError, RolloutSpec, matches, parse_selector, parse_waves, pick_variant

__all__ = [
    "ABORTED",
    "DONE",
    "PAUSED",
    "RUNNING",
    "Gates",
    "RolloutEngine",
    "RolloutError",
    "RolloutSpec",
    "Verdict",
    "matches",
    "parse_selector",
    "parse_waves",
    "pick_variant",
]
