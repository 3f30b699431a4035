"""One device's behaviour on one version over one window, as the database summed its telemetry and prediction rows.

The sums are made in SQL (``fleet.store.windows``): the p95 of a device over a window is the median of its
batches' p95s, so one slow batch (a garbage collection, a cron job) does not make a device regressed.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.store import WindowPredictions, WindowTelemetry

__all__ = ["DeviceStats"]


@dataclass(frozen=True)
class DeviceStats:
    batches: int = 0
    requests: int = 0
    server_errors: int = 0
    client_errors: int = 0
    p95_ms: float | None = None
    rows: int = 0  # prediction sums: answers sampled
    values: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    classes: tuple[int, ...] | None = None

    @property
    def calls(self) -> int:
        """Calls the version could be judged on: answered plus its own (server-side) failures."""
        return self.requests + self.server_errors

    @property
    def error_rate(self) -> float:
        return self.server_errors / self.calls if self.calls else 0.0

    @property
    def mean(self) -> float | None:
        return self.total / self.values if self.values else None

    @property
    def std(self) -> float | None:
        mean = self.mean
        return max(self.total_sq / self.values - mean * mean, 0.0) ** 0.5 if mean is not None else None

    @classmethod
    def of(cls, telemetry: WindowTelemetry | None, predictions: WindowPredictions | None) -> DeviceStats:
        """A window's statistics from its telemetry and prediction sums (None: no rows of that kind in it)."""
        t = telemetry or WindowTelemetry(0, 0, 0, 0, None)
        p = predictions or WindowPredictions(0, 0, 0, 0.0, 0.0, None)
        return cls(t.batches, t.requests, t.server_errors, t.client_errors, t.p95_ms, p.rows, p.values, p.total, p.total_sq, p.classes)
