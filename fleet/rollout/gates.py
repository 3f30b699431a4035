"""The rollout gates: pure functions of the rollout's spec and the statistics; go, wait or abort with a reason. No I/O.

Health gate, per device and paired: each device of the wave is compared with *itself* on
the version it ran before it moved (its own window of ``baseline_s`` before the move), so a
Pi is compared with a Pi and one device's claims only ever decide about that device.
A concurrent control corrects for what hits the whole fleet at once: devices of the same
rollout not yet moved, over the same windows (of the same hardware class where there are
``min_control`` of them), as automated canary analysis does it. A moved device whose
latency ratio, divided by the control's, passes ``max_p95_ratio`` (and by more than
``p95_floor_ms``), whose server-side error rate rose by more than ``max_error_rate_increase``
beyond the control's rise, or whose predictions drifted past the drift limits, *regressed*.
A wave aborts when more than ``max_regressed`` of its judged devices regressed. The pooled
server error rate of all moved devices (paired the same way) is a second line that also
catches devices with too little traffic to be judged one by one.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from fleet.rollout.spec import Gates, share
from fleet.rollout.stats import DeviceStats
from fleet.store import ShadowHealth

__all__ = ["Subject", "Verdict", "health_gate", "install_gate", "shadow_gate"]

GO: Final = "go"
WAIT: Final = "wait"
ABORT: Final = "abort"


@dataclass(frozen=True)
class Verdict:
    decision: Literal["go", "wait", "abort"]
    reason: str = ""
    regressed: tuple[str, ...] = field(default=())  # device ids


@dataclass(frozen=True)
class Subject:
    """A device in the gate: its hardware class, and its statistics before and after (its move, or the wave's start)."""

    device: str
    hardware: str
    before: DeviceStats
    after: DeviceStats


def install_gate(gates: Gates, failed: int, members: int, wave: int) -> Verdict:
    if failed > share(gates.max_failed, members):
        return Verdict(ABORT, f"install gate: {failed} of {members} devices in wave {wave + 1} failed to install")
    return Verdict(GO)


def health_gate(gates: Gates, version: str, moved: list[Subject], control: Mapping[str, list[Subject]], waited_out: bool) -> Verdict:
    """Judge a wave: ``moved`` its devices now on ``version``; ``control[device]`` the rollout's devices not yet
    moved, measured over that device's own windows (before / since its move)."""
    silent = [s.device for s in moved if s.after.batches == 0]
    if silent and not waited_out:  # not one report since the move: nothing to judge it on yet
        return Verdict(WAIT, f"{len(silent)} of {len(moved)} devices have not reported on {version} yet")
    calls = sum(s.after.calls for s in moved)
    if calls < gates.min_requests:
        return Verdict(WAIT if not waited_out else GO, f"{calls} calls on {version} so far, waiting for {gates.min_requests}")
    judged = [s for s in moved if _enough(gates, s)]
    memo: dict[tuple[int, str], _Peers] = {}
    findings = {s.device: f for s in judged if (f := _regression(gates, s, _peers(gates, s, control.get(s.device, []), memo)))}
    limit = share(gates.max_regressed, len(judged))
    if len(findings) > limit:
        return Verdict(ABORT, _reason(findings, judged, moved), tuple(findings))
    quiet = [s for s in moved if not _enough(gates, s)]
    pooled = _pooled_errors(gates, quiet) or _pooled_latency(gates, quiet)
    if pooled:
        return Verdict(ABORT, f"health gate: {pooled}")
    return Verdict(
        GO, f"{len(findings)} of {len(judged)} judged devices regressed (limit {limit}); {len(moved) - len(judged)} too quiet to judge"
    )


def _enough(gates: Gates, s: Subject) -> bool:
    return s.before.calls >= gates.min_device_requests and s.after.calls >= gates.min_device_requests


@dataclass(frozen=True)
class _Peers:
    """A device's usable control and what it says: the load factor on latency and the rise of the error rate."""

    subjects: list[Subject]
    factor: float
    rise: float


def _peers(gates: Gates, s: Subject, control: list[Subject], memo: dict[tuple[int, str], _Peers]) -> _Peers:
    """The control of ``s`` and its figures, worked out once per control list and hardware class (every device moved
    in one step shares one list: without this a wave of thousands against thousands unmoved is quadratic)."""
    key = (id(control), s.hardware)
    if key not in memo:
        peers = _control_of(gates, s, control)
        memo[key] = _Peers(peers, _latency_factor(peers), _error_rise(peers))
    return memo[key]


def _control_of(gates: Gates, s: Subject, control: list[Subject]) -> list[Subject]:
    usable = [c for c in control if _enough(gates, c)]
    same = [c for c in usable if c.hardware == s.hardware]
    if len(same) >= gates.min_control:
        return same
    return usable if len(usable) >= gates.min_control else []


MAX_LOAD_FACTOR = 10.0


def _latency_factor(control: list[Subject]) -> float:
    """How much slower the unmoved devices got over the same windows: the median of their own after/before ratios.

    Bounded to [1, 10]: a control that got faster must not make an unchanged device look slower, and no claimed
    load hides a regression without limit (a median of at least ``min_control`` devices moves it at all)."""
    ratios = [c.after.p95_ms / max(c.before.p95_ms, 1e-6) for c in control if c.after.p95_ms is not None and c.before.p95_ms is not None]
    return min(max(statistics.median(ratios), 1.0), MAX_LOAD_FACTOR) if ratios else 1.0


def _error_rise(control: list[Subject]) -> float:
    rises = [c.after.error_rate - c.before.error_rate for c in control]
    return max(statistics.median(rises), 0.0) if rises else 0.0


def _regression(gates: Gates, s: Subject, control: _Peers) -> str:
    """Why this device regressed, or '' when it did not."""
    peers = control.subjects
    b, a = s.before, s.after
    if a.p95_ms is not None and b.p95_ms is not None:
        factor = control.factor
        expected = b.p95_ms * factor
        ratio = a.p95_ms / max(expected, 1e-6)
        if ratio > gates.max_p95_ratio and a.p95_ms - expected > gates.p95_floor_ms:
            load = f", {factor:.2f}x load on {len(peers)} unmoved devices" if peers else ""
            return f"{s.device} p95 {a.p95_ms:.1f} ms against {b.p95_ms:.1f} ms before it moved ({ratio:.1f}x{load})"
    rise = a.error_rate - b.error_rate - control.rise
    if rise > gates.max_error_rate_increase:
        return f"{s.device} server errors {a.error_rate:.1%} against {b.error_rate:.1%} before it moved"
    return _drift(gates, s)


def _drift(gates: Gates, s: Subject) -> str:
    b, a = s.before, s.after
    if min(a.rows, b.rows) < gates.min_device_requests:
        return ""
    if gates.max_class_shift is not None and a.classes and b.classes and len(a.classes) == len(b.classes):
        n, m = sum(a.classes), sum(b.classes)
        if n and m:
            shift = 0.5 * sum(abs(x / n - y / m) for x, y in zip(a.classes, b.classes))
            if shift > gates.max_class_shift:
                return f"{s.device} prediction drift: {shift:.1%} of answers moved top class (limit {gates.max_class_shift:.1%})"
    if gates.max_mean_shift is not None and a.mean is not None and b.mean is not None and b.std is not None:
        moved = abs(a.mean - b.mean) / max(b.std, 1e-12)
        if moved > gates.max_mean_shift:
            return f"{s.device} prediction drift: mean output moved {moved:.2f} standard deviations (limit {gates.max_mean_shift:g})"
    return ""


def _pooled_errors(gates: Gates, quiet: list[Subject]) -> str:
    """Second line, for devices too quiet to be judged one by one: their calls pooled, before and after.

    Each device weighs at most ``min_device_requests`` calls on either side, so one device claiming millions of
    calls cannot outvote the others (nor can its errors alone abort a wave the count rule would let through)."""
    cap = gates.min_device_requests

    def pooled(side: str) -> tuple[float, float]:
        weight = rate = 0.0
        for s in quiet:
            st: DeviceStats = getattr(s, side)
            if st.calls:
                w = min(st.calls, cap)
                weight, rate = weight + w, rate + w * st.error_rate
        return weight, rate / weight if weight else 0.0

    (w_before, before), (w_after, after) = pooled("before"), pooled("after")
    if min(w_before, w_after) < cap:
        return ""
    if after - before > gates.max_error_rate_increase:
        return f"server error rate {after:.1%} on {len(quiet)} devices too quiet to judge alone, against {before:.1%} before they moved"
    return ""


def _pooled_latency(gates: Gates, quiet: list[Subject]) -> str:
    """Second line for latency: the median over the quiet devices of their own p95 after / before their move.

    A median, so one device's claim moves nothing; judged only when the quiet devices together answered at least
    ``min_device_requests`` calls on each side (each counted up to that many), as for errors. Without it a wave of
    devices that each reported a few slow calls since the move passed the gate on latency unjudged."""
    cap = gates.min_device_requests
    timed = [(s, s.before.p95_ms, s.after.p95_ms) for s in quiet if s.before.p95_ms is not None and s.after.p95_ms is not None]
    if min(sum(min(s.before.calls, cap) for s, _, _ in timed), sum(min(s.after.calls, cap) for s, _, _ in timed)) < cap:
        return ""
    ratio = statistics.median(after / max(before, 1e-6) for _, before, after in timed)
    rise = statistics.median(after - before for _, before, after in timed)
    if ratio > gates.max_p95_ratio and rise > gates.p95_floor_ms:
        return f"p95 {ratio:.1f}x (+{rise:.1f} ms, median) on {len(timed)} devices too quiet to judge alone, against before they moved"
    return ""


def _reason(findings: dict[str, str], judged: list[Subject], moved: list[Subject]) -> str:
    """``health gate: 6 of 20 devices regressed: sim-0003 p95 10.2 ms against 2.0 ms before it moved, ...; by hardware: ...``."""
    shown = list(findings.values())[:5]
    more = f"; and {len(findings) - len(shown)} more" if len(findings) > len(shown) else ""
    text = f"health gate: {len(findings)} of {len(judged)} devices regressed: {'; '.join(shown)}{more}"
    hardware = {s.device: s.hardware for s in moved}
    per_class = Counter(hardware[d] for d in findings)
    of_class = Counter(s.hardware for s in judged)
    if len(of_class) > 1:
        text += "; by hardware: " + ", ".join(f"{hw or '?'} {per_class[hw]} of {of_class[hw]}" for hw in sorted(of_class))
    return text


def shadow_gate(gates: Gates, version: str, shadowing: int, h: ShadowHealth, waited_out: bool) -> Verdict:
    """The shadow on live inputs before any device switches: enough comparisons, then errors, agreement, difference, latency."""
    if shadowing == 0:
        return Verdict(ABORT, "shadow gate: no device of the first wave ran the shadow")
    if h.compared < gates.shadow_min_compared:
        if not waited_out:
            return Verdict(WAIT)
        return Verdict(
            ABORT,
            f"shadow gate: only {h.compared} live inputs compared within the wave timeout (need {gates.shadow_min_compared})"
            + _share_text(h, " — the devices' serving.shadow_budget sampled the rest out (a tenth of it while a device is busy)"),
        )
    if h.errors and h.errors / (h.errors + h.compared) > gates.max_error_rate_increase:
        return Verdict(ABORT, f"shadow gate: {version} failed {h.errors} calls in shadow against {h.compared} compared")
    agreement = h.agreement or 0.0
    if gates.min_agreement is not None and agreement < gates.min_agreement:
        return Verdict(
            ABORT,
            f"shadow gate: {version} agreed with the serving version on {agreement:.1%} of {h.compared} live inputs"
            f" (need {gates.min_agreement:.1%})",
        )
    if gates.max_shadow_diff is not None and h.mean_abs_diff is not None and h.mean_abs_diff > gates.max_shadow_diff:
        return Verdict(
            ABORT, f"shadow gate: mean absolute difference {h.mean_abs_diff:.4g} from the serving version (limit {gates.max_shadow_diff:g})"
        )
    if h.p95_ms is not None and h.active_p95_ms:
        ratio = h.p95_ms / max(h.active_p95_ms, 1e-6)
        if ratio > gates.max_p95_ratio and h.p95_ms - h.active_p95_ms > gates.p95_floor_ms:
            return Verdict(ABORT, f"shadow gate: p95 latency in shadow {ratio:.1f}x the serving version's (limit {gates.max_p95_ratio:g}x)")
    return Verdict(GO, f"agreement {agreement:.4f} over {h.compared} compared on {h.devices} devices" + _share_text(h))


def _share_text(h: ShadowHealth, why: str = "") -> str:
    """ ", 12.5% of the live rows" when the shadow compared a sample of what was served."""
    share = h.share
    return f", {share:.1%} of the live rows{why}" if share is not None and share < 1.0 else ""
