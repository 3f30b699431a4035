"""One device's behaviour on one version over one window, summed from its telemetry and prediction rows. Pure.

The p95 of a device over a window is the median of its batches' p95s: one slow batch
(a garbage collection, a cron job) does not make a device regressed.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from fleet.store import PredictionRow, TelemetryRow

__all__ = ["DeviceStats", "device_stats"]


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


def device_stats(
    telemetry: Iterable[TelemetryRow], predictions: Iterable[PredictionRow], version: str, since: float, until: float
) -> DeviceStats:
    """One device's rows (the caller passes one device's) on ``version`` with since <= ts < until, summed."""
    t = [r for r in telemetry if r.version == version and since <= r.ts < until]
    p = [r for r in predictions if r.version == version and since <= r.ts < until]
    p95s = [r.p95_ms for r in t if r.p95_ms is not None]
    classes: list[int] | None = None
    for r in p:
        if r.classes is None:
            continue
        if classes is None:
            classes = list(r.classes)
        elif len(classes) == len(r.classes):  # another width (another output shape) is not comparable: left out
            classes = [a + b for a, b in zip(classes, r.classes)]
    return DeviceStats(
        batches=len(t),
        requests=sum(r.requests for r in t),
        server_errors=sum(r.server_errors for r in t),
        client_errors=sum(r.client_errors for r in t),
        p95_ms=statistics.median(p95s) if p95s else None,
        rows=sum(r.rows for r in p),
        values=sum(r.values for r in p),
        total=sum(r.total for r in p),
        total_sq=sum(r.total_sq for r in p),
        classes=tuple(classes) if classes is not None else None,
    )
