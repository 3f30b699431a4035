"""What a model answered over one telemetry window, as a distribution the controller can compare across versions.

Why: a new version can pass its golden samples and serve fast without errors, and
still answer differently on the fleet's real inputs (a class it now always picks,
outputs shifted by a preprocessing change). The controller's health gate compares
these statistics of the new version with the old one's on the rest of the fleet
(prediction drift). Only sums are kept — the answers themselves never leave the
device — and they add across devices and windows: the first output's row and value
counts, sum and sum of squares (mean and spread), and for a class-score output
(last dimension 2..MAX_CLASSES) how often each class came out on top.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MAX_CLASSES", "PredictionStats"]

MAX_CLASSES = 1000  # beyond this a last dimension is taken for features, not class scores


@dataclass
class _Window:
    output: str
    rows: int = 0
    values: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    nonfinite: int = 0  # NaN/inf values, left out of the sums (and worth a look on their own)
    classes: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "output": self.output,
            "rows": self.rows,
            "values": self.values,
            "sum": self.total,
            "sumsq": self.total_sq,
            "nonfinite": self.nonfinite,
        }
        if self.classes is not None:
            out["classes"] = self.classes.tolist()
        return out


def _sums(arr: np.ndarray) -> tuple[float, float, int, int]:
    """(sum, sum of squares, values left out, values summed), in float64; NaN, inf and overflowing values left out."""
    a = arr.astype(np.float64, copy=False)
    total, total_sq = float(a.sum()), float(np.vdot(a, a))  # no np.errstate here: it costs more than the sums
    if math.isfinite(total) and math.isfinite(total_sq):
        return total, total_sq, 0, int(a.size)
    with np.errstate(over="ignore", invalid="ignore"):
        finite = a[np.isfinite(a)]
        total, total_sq = float(finite.sum()), float(np.vdot(finite, finite))
    if not (math.isfinite(total) and math.isfinite(total_sq)):  # values too large to square: none of this call's counts
        return 0.0, 0.0, int(a.size), 0
    return total, total_sq, int(a.size - finite.size), int(finite.size)


class PredictionStats:
    """Per (model, version): added to on every answered call, taken (and reset) once per telemetry window."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()

    def add(self, model: str, version: str, outputs: dict[str, np.ndarray]) -> None:
        """On the serving path, so a handful of numpy calls at most (about 5 us for one row of class scores)."""
        if not outputs:
            return
        name, arr = next(iter(outputs.items()))
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub" or arr.size == 0:
            return  # strings, objects, nothing: nothing to sum
        total, total_sq, nonfinite, values = _sums(arr)
        width = arr.shape[-1] if arr.ndim >= 2 else 0
        top: int | np.ndarray | None = None
        if 2 <= width <= MAX_CLASSES and not nonfinite:
            top = int(arr.argmax()) if arr.size == width else np.bincount(arr.reshape(-1, width).argmax(axis=1), minlength=width)
        rows = int(arr.shape[0]) if arr.ndim else 1
        with self._lock:
            w = self._windows.get((model, version))
            if w is None or w.output != name:
                w = self._windows[(model, version)] = _Window(name)
            w.rows += rows
            w.values += values
            w.total += total
            w.total_sq += total_sq
            w.nonfinite += nonfinite
            if top is not None:
                if w.classes is None or w.classes.shape != (width,):
                    w.classes = np.zeros(width, dtype=np.int64)
                if isinstance(top, int):
                    w.classes[top] += 1
                else:
                    w.classes += top

    def take(self) -> dict[tuple[str, str], dict[str, Any]]:
        with self._lock:
            windows, self._windows = self._windows, {}
        return {key: w.to_json() for key, w in windows.items()}
