"""The tests' fake hardware trees live in ``fleet.hardware_trees`` (the demo uses them too)."""

from fleet.hardware_trees import *  # noqa: F403
from fleet.hardware_trees import accel, write  # noqa: F401
