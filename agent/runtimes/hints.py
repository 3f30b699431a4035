"""What is known of a model's inputs beyond its file, and the inputs a model is warmed up with.

Why: a model with dynamic dimensions does not say which sizes it accepts — a reflect
Pad refuses 1 sample, a 0-d sample rate must be 8000 or 16000 — so the inputs it
will really see come first: the bundle's golden samples, or the user's ``--input``.
Only without them is the warm-up synthetic, and then the dimension policy tries
realistic sizes (``SYNTHETIC_SIZES``) for the dynamic non-batch dimensions, keeping
the batch at 1, and reports every size it tried when none works. The same samples
give OpenVINO the static shapes it converts a dynamic-rank ONNX model with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from agent.errors import EdgefleetError, WarmupFailed
from agent.runtimes.tensors import TensorSpec

__all__ = ["InputHints", "SYNTHETIC_SIZES", "MAX_SYNTHETIC_ELEMENTS", "synthetic_inputs", "warmup_inputs"]

# Sizes tried, in order, for every dynamic dimension that is not a batch axis: 1 first (the cheapest), then sizes real
# models take (audio frames, token counts, image sides). A size whose inputs would pass MAX_SYNTHETIC_ELEMENTS is skipped.
SYNTHETIC_SIZES = (1, 16, 64, 256, 512, 1024, 4096)
MAX_SYNTHETIC_ELEMENTS = 1 << 24  # 64 MiB of float32 per input: a device must not fall over warming up


@dataclass(frozen=True)
class InputHints:
    """Inputs the model will see (``samples``: by name, or one array for a one-input model) and the batch axis of each
    named tensor (``batch_axes``; None: no batch axis). Given to ``Runtime.load``; empty means nothing is known."""

    samples: tuple[Mapping[str, np.ndarray] | np.ndarray, ...] = ()
    batch_axes: Mapping[str, int | None] = field(default_factory=dict)

    def shapes(self) -> list[tuple[str | None, list[int]]]:
        """The first sample's shapes, (name, shape) in its order; name None for a one-input model's bare array."""
        if not self.samples:
            return []
        first = self.samples[0]
        if isinstance(first, np.ndarray):
            return [(None, list(first.shape))]
        return [(name, list(np.shape(arr))) for name, arr in first.items()]


def synthetic_inputs(specs: tuple[TensorSpec, ...], size: int) -> dict[str, np.ndarray]:
    """Zeros for every input: a dynamic batch axis of 1, every other dynamic dimension ``size``."""
    out = {}
    for s in specs:
        dims = [d if d >= 0 else (1 if i == s.batch_axis else size) for i, d in enumerate(s.shape)]
        out[s.name] = np.zeros(dims, dtype=s.accepts)
    return out


def _sizes(specs: tuple[TensorSpec, ...]) -> list[int]:
    """The policy's sizes for these inputs: only 1 when no dynamic dimension is left to choose."""
    free = any(d < 0 and i != s.batch_axis for s in specs for i, d in enumerate(s.shape))
    if not free:
        return [1]
    return [n for n in SYNTHETIC_SIZES if all(math.prod(a.shape) <= MAX_SYNTHETIC_ELEMENTS for a in synthetic_inputs(specs, n).values())]


def warmup_inputs(
    specs: tuple[TensorSpec, ...], hints: InputHints, run: Callable[[Mapping[str, object] | np.ndarray], object]
) -> tuple[Mapping[str, object] | np.ndarray, str]:
    """The inputs to warm up with, already run once through ``run``, and how they were found (for ``describe()``).

    The first sample when there is one (its failure is the model's or the sample's, raised as it is); else the first
    synthetic size the model accepts, or ``WarmupFailed`` naming every size tried and what each one got.
    """
    if hints.samples:
        run(hints.samples[0])
        return hints.samples[0], "the first sample given (golden samples or --input)"
    tried: list[str] = []
    for n in _sizes(specs):
        candidate = synthetic_inputs(specs, n)
        try:
            run(candidate)
        except EdgefleetError as exc:
            tried.append(f"{n}: {str(exc)[:160]}")
            continue
        return candidate, f"synthetic zeros, batch 1, other dynamic dimensions {n}"
    raise WarmupFailed(
        "warm-up found no input the model accepts: tried zeros with batch 1 and the dynamic dimensions at "
        + "; ".join(tried)
        + ". Give real inputs (edge-agent infer --input, or golden samples in the bundle)"
    )
