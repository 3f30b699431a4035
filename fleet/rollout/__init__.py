"""Wave rollouts: spec (what), plan (which devices, waves, variants), stats (a device's numbers), gates (pure judgement),
engine (observe → judge → act)."""

from fleet.rollout.engine import ABORTED, DONE, PAUSED, RUNNING, RolloutEngine
from fleet.rollout.gates import Verdict
from fleet.rollout.plan import matches, parse_selector, parse_waves, pick_variant
from fleet.rollout.spec import Gates, RolloutError, RolloutSpec

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
