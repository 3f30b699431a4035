"""Golden samples: known inputs and the outputs a correct variant gives, checked on a loaded runtime.

Why here: a bundle carries them and selection checks every candidate against them
before trusting it — the proof that a runtime really runs a variant, not just loads
it. Warm-up and health checks use these shapes, which the model is known to accept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from agent.errors import HealthCheckFailed

__all__ = ["GoldenSample"]


@dataclass(frozen=True)
class GoldenSample:
    """Known inputs and the outputs a correct variant gives, with the tolerance allowed."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    atol: float = 1e-4
    rtol: float = 1e-3

    def check(self, got: Mapping[str, np.ndarray]) -> None:
        for name, want in self.outputs.items():
            if name not in got:
                raise HealthCheckFailed(f"golden sample: output {name!r} missing")
            have = np.asarray(got[name], dtype=np.float64)
            if have.shape != want.shape:
                raise HealthCheckFailed(f"golden sample: output {name!r} has shape {list(have.shape)}, expected {list(want.shape)}")
            err = float(np.max(np.abs(have - want))) if want.size else 0.0
            if not np.allclose(have, want, atol=self.atol, rtol=self.rtol):
                raise HealthCheckFailed(f"golden sample: output {name!r} max abs error {err:.3g} exceeds atol={self.atol} rtol={self.rtol}")
