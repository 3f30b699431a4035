"""``dev/{id}/telemetry``: one batch per window, identified by (device, session, seq).

Per model *version* (a hot swap inside a window gives two entries): answered calls, errors
by code, latency summary, prediction sums, the shadow's comparison. Error codes split in two:
``SERVER_ERRORS`` are the version's fault and count against it in a rollout;
``CLIENT_ERRORS`` are the caller's (a bad request is not a bad model) and never do.
Everything a device reports is its claim: bounded here, stamped with the controller's own
receive time on arrival, and only ever compared with the same device's earlier claims.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from agent.wire.codec import WireModel
from agent.wire.device import UpdateState
from agent.wire.fields import MAX_CALLS, BigCount, Code, Count, Id, Latency, Name, Sum, SumSq, Timestamp

__all__ = [
    "CLIENT_ERRORS",
    "SERVER_ERRORS",
    "ModelWindow",
    "PredictionSums",
    "ShadowWindow",
    "SystemMetrics",
    "TelemetryBatch",
    "server_errors",
]

SERVER_ERRORS = frozenset({"internal", "deadline_exceeded", "overloaded", "runtime_failed"})
CLIENT_ERRORS = frozenset({"bad_request", "shape_mismatch", "unknown_model"})
MAX_CLASSES = 32_768

ErrorCounts = Annotated[dict[Code, Count], Field(max_length=16)]


def server_errors(errors: dict[str, int]) -> int:
    """The errors that count against a version: anything not known to be the caller's fault."""
    return sum(n for code, n in errors.items() if code not in CLIENT_ERRORS)


class PredictionSums(WireModel):
    """What one version answered over the window (a sample of its calls): sums, not values."""

    output: Name
    rows: Count
    values: BigCount
    sum: Sum
    sumsq: SumSq
    nonfinite: BigCount = 0
    classes: Annotated[list[BigCount], Field(max_length=MAX_CLASSES)] | None = None


class ShadowWindow(WireModel):
    """A shadow version run beside the serving one on the same live inputs."""

    version: Name
    kind: Name
    compared: Count
    agreed: Count
    agreement: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    abs_diff_sum: Annotated[float, Field(ge=0.0, le=1e30)]
    values: BigCount
    mean_abs_diff: Annotated[float, Field(ge=0.0, le=1e30)] | None = None
    mismatched: Count
    errors: Count
    skipped: Count
    p95_ms: Latency | None = None
    active_p95_ms: Latency | None = None

    @model_validator(mode="after")
    def _agreed_within_compared(self) -> ShadowWindow:
        if self.agreed > self.compared:
            raise ValueError("agreed > compared")
        return self


class ModelWindow(WireModel):
    """One model version over one telemetry window."""

    model: Name
    version: Name
    variant: Name = ""
    runtime: Name = ""
    device: Name = ""
    count: Count  # answered
    errors: ErrorCounts = {}
    p50_ms: Latency | None = None
    p95_ms: Latency | None = None
    p99_ms: Latency | None = None
    predictions: PredictionSums | None = None
    shadow: ShadowWindow | None = None


class SystemMetrics(WireModel):
    cpu_percent: Annotated[float, Field(ge=0.0, le=100_000.0)]
    process_cpu_percent: Annotated[float, Field(ge=0.0, le=100_000.0)]
    rss_bytes: Annotated[int, Field(ge=0, le=2**50)]
    memory_percent: Annotated[float, Field(ge=0.0, le=100.0)]
    temperature_c: Annotated[float, Field(ge=-100.0, le=300.0)] | None = None


class TelemetryBatch(WireModel):
    MAX_BYTES: ClassVar[int] = 1024 * 1024
    device_id: Id
    session: Annotated[int, Field(ge=0, le=2**62)]
    seq: Annotated[int, Field(ge=0, le=2**62)]
    ts: Timestamp  # the device's clock: information only
    interval_s: Annotated[float, Field(gt=0.0, le=86_400.0)]
    dropped_total: Annotated[int, Field(ge=0, le=2**62)]
    models: Annotated[list[ModelWindow], Field(max_length=64)]
    unattributed_errors: ErrorCounts = {}  # errors with no loaded version to blame (unknown model, unreadable request)
    throughput_rps: Annotated[float, Field(ge=0.0, le=float(MAX_CALLS))]
    queue_depth: Count
    system: SystemMetrics
    update: UpdateState | None = None
