"""Shadow mode: run a candidate version on the live inputs of the active one, after the reply, and compare.

Why: golden samples say a model computes what its converter meant; only the
fleet's real inputs say whether it agrees with the model it replaces. The shadow
answers nobody: ``ShadowRunner.offer`` (called by ``ModelHost`` once the active
model has answered) only queues the inputs and the active outputs; one thread runs
the shadow and compares. The queue is bounded — when the shadow cannot keep up,
calls are skipped and counted, never waited for — so a slow candidate costs the
device spare CPU, not latency.

The shadow yields to serving (issue 18: with a shadow running on every call, a
CPU-bound agent served half the requests), measured in benchmarks/serving.py: a CPU
budget — the shadow takes a call only while its measured cost (running the candidate
plus comparing) stays within ``budget`` of one core's wall time; the other calls are
sampled out and counted as skipped (in rows, like compared), so the controller knows
the share of rows it compared and the shadow gate says it. (The shadow's thread once
also ran at niceness 19: under load that stretched the shadow's measured latency 21x
against the serving version's and the shadow gate's latency check refused a good
candidate — the shadow must be timed under the serving path's conditions.)

The budget is for spare CPU only: every 0.1 s the shadow thread samples the machine's
idle time and the CPU of the threads that answer requests (``SpareCpu``); while less
than ``spare_cores`` of a core was idle or serving used ``busy_cores`` of one or more,
the budget runs at a tenth of its rate with a tenth of its burst (a trickle, so that
the shadow gate of a device that is always busy still fills, slowly).

Agreement is per row: for a class-score output (last dimension 2 or more) the top
class must be the same (top-1 agreement); otherwise every value must be within
``atol + rtol * |active|``. A shadow whose outputs have other names or shapes
disagrees on every row.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from agent import logs
from agent.serve.host import ModelHost, ServingModel

__all__ = ["Comparison", "CpuBudget", "ShadowRunner", "SpareCpu", "compare_outputs"]

log = logging.getLogger("edgefleet.shadow")


@dataclass(frozen=True)
class Comparison:
    rows: int
    agreed: int
    abs_diff_sum: float  # over every compared value
    values: int
    kind: str  # "top1" (class scores) or "close" (values within tolerance)
    mismatched: bool = False  # other output names or shapes


def _rows(a: np.ndarray) -> int:
    return int(a.shape[0]) if a.ndim else 1


def _rows_of(outputs: Mapping[str, np.ndarray]) -> int:
    """The rows of a call's answer (its first output's first dimension; 0 for an answer without outputs)."""
    for first in outputs.values():
        return _rows(first)
    return 0


def compare_outputs(active: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray], rtol: float, atol: float) -> Comparison:
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf and the like: counted as disagreement, not warned about
        return _compare(active, shadow, rtol, atol)


def _compare(active: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray], rtol: float, atol: float) -> Comparison:
    first = next(iter(active.values()), np.zeros(0))
    rows = _rows(first)
    kind = "top1" if first.ndim >= 2 and first.shape[-1] >= 2 else "close"
    if set(active) != set(shadow) or any(np.shape(shadow[k]) != a.shape for k, a in active.items()):
        return Comparison(rows, 0, 0.0, 0, kind, mismatched=True)
    agree = np.ones(rows, dtype=bool)
    diff_sum, values = 0.0, 0
    for name, a in active.items():
        b = np.asarray(shadow[name])
        if a.size == 0 or rows == 0:
            continue  # nothing in it to disagree on
        if a.dtype.kind not in "fiub":
            agree &= (a == b).reshape(rows, -1).all(axis=1)
            continue
        af, bf = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
        diff = np.abs(af - bf)
        finite = np.isfinite(diff)
        diff_sum += float(diff[finite].sum())
        values += int(finite.sum())
        if a.ndim >= 2 and a.shape[-1] >= 2:
            width = a.shape[-1]
            same_top = af.reshape(-1, width).argmax(axis=1) == bf.reshape(-1, width).argmax(axis=1)
            agree &= same_top.reshape(rows, -1).all(axis=1)
        else:
            close = (diff <= atol + rtol * np.abs(af)) | (af == bf) | (np.isnan(af) & np.isnan(bf))  # == for equal infinities
            agree &= close.reshape(rows, -1).all(axis=1) if a.ndim else bool(close)
    return Comparison(rows, int(agree.sum()), diff_sum, values, kind)


@dataclass
class _Window:
    version: str
    kind: str = ""
    compared: int = 0  # rows
    agreed: int = 0
    abs_diff_sum: float = 0.0
    values: int = 0
    mismatched: int = 0  # calls whose outputs had other names or shapes
    errors: int = 0  # calls the shadow failed
    skipped: int = 0  # rows not compared: the shadow was behind or over its CPU budget (sampled out)
    shadow_ms: list[float] = field(default_factory=list)
    active_ms: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "kind": self.kind,
            "compared": self.compared,
            "agreed": self.agreed,
            "agreement": round(self.agreed / self.compared, 6) if self.compared else None,
            "abs_diff_sum": self.abs_diff_sum,
            "values": self.values,
            "mean_abs_diff": self.abs_diff_sum / self.values if self.values else None,
            "mismatched": self.mismatched,
            "errors": self.errors,
            "skipped": self.skipped,
        }
        for key, ms in (("p95_ms", self.shadow_ms), ("active_p95_ms", self.active_ms)):
            out[key] = round(float(np.percentile(ms, 95)), 3) if ms else None
        return out


class CpuBudget:
    """Admit work while its measured cost stays within ``fraction`` of one core's wall time.

    Credit grows with wall time (``fraction`` seconds per second, capped at ``burst_s``). Admitting a call
    reserves its estimated cost at once, and the call, when it has run, settles the difference to what it
    measured: calls queued but not yet run are already charged, so a burst of arrivals cannot all be admitted
    against the same credit. The estimate is a moving average, so sampling follows the candidate's real cost;
    until one call has been measured only one is admitted at a time. A candidate dearer a call than the whole
    burst is admitted whenever the credit is full again (one call per ``cost / fraction`` seconds), not never.
    Fraction 1.0 or more never refuses (a device that wants every call compared)."""

    def __init__(self, fraction: float, burst_s: float = 0.05, clock: Any = time.monotonic) -> None:
        self.fraction, self.burst_s, self._clock = fraction, burst_s, clock
        self.full = (fraction, burst_s)  # the rate and burst while the machine has CPU to spare
        self._credit = burst_s
        self._last = clock()
        self.pending = 0  # admitted calls not yet settled
        self.cost_s = 0.0  # moving average of one call's cost
        self.spent_s = 0.0  # what the admitted calls cost, all told
        self.largest_s = 0.0  # the dearest single call
        self.overrun_s = 0.0  # the sum of what calls cost beyond their reservation: the estimate's error

    def admit(self) -> float | None:
        """The reservation for one call (settle it with ``spend`` or ``cancel``), or None to skip the call."""
        if self.fraction < 1.0:
            now = self._clock()
            self._credit = min(self.burst_s, self._credit + (now - self._last) * self.fraction)
            self._last = now
            if self.pending and self.cost_s == 0.0:
                return None  # the cost is not known yet: one call measures it first
            if self._credit < min(self.cost_s, self.burst_s):
                return None  # (a call dearer than the whole burst is admitted on a full burst: never, it would stop forever)
            self._credit -= self.cost_s
        self.pending += 1
        return self.cost_s

    def throttle(self, busy: bool, share: float = 0.1) -> None:
        """While the machine is busy, ``share`` of the rate and of the burst; the whole of both when it is not. (``admit``
        caps the credit at the burst in force, so credit saved while idle is not spent on a busy machine.)"""
        fraction, burst = self.full
        if busy and fraction < 1.0:
            fraction, burst = fraction * share, burst * share
        self.fraction, self.burst_s = fraction, burst

    def cancel(self, reserved: float) -> None:
        """An admitted call that was not run after all: its reservation goes back."""
        self._credit += reserved
        self.pending -= 1

    def spend(self, seconds: float, reserved: float) -> None:
        self._credit += reserved - seconds
        self.pending -= 1
        self.spent_s += seconds
        self.largest_s = max(self.largest_s, seconds)
        self.overrun_s += max(0.0, seconds - reserved)
        self.cost_s = seconds if self.cost_s == 0.0 else 0.8 * self.cost_s + 0.2 * seconds


def idle_cpu_seconds() -> float:
    """Seconds every core of the machine has been idle since boot (idle and waiting for I/O)."""
    t = psutil.cpu_times()
    return float(t.idle + getattr(t, "iowait", 0.0))


class SpareCpu:
    """Whether there is CPU to spare for the shadow: at least ``idle_cores`` of a core idle machine-wide, and the threads
    that answer requests using less than ``busy_cores`` of one, over the last ``interval_s`` or more.

    Why both: the shadow's cost lands on whatever else runs (the broker, the application beside the agent) — a busy
    core is busy whoever holds it; and inside the agent the shadow's Python steps hold the interpreter lock the serving
    path needs, so a busy serving path pays for them even on a machine with idle cores (measured: at 5 % of a core
    the shadow cost a saturated agent 5-10 % of its requests/s with half a core idle). Serving's CPU is that of the
    threads that answer requests (``Serving.cpu_s``: paho's network thread, the workers), not the process's: that
    would count the shadow's own runtime threads, and the agent's other work, as serving. The shadow's own time (``sample``'s
    ``shadow_s``) counts as idle: without the shadow it would be. In a container ``/proc/stat`` is the host's: there
    set ``idle_cores`` to 0 (not read then) and let serving's CPU decide. Two approximations: the shadow's time is wall
    time (its runtime's threads may use more CPU, or less on a contended core), and the runtimes' own worker threads
    are counted as neither serving nor shadow. ``sample`` is called by the shadow thread, never on the
    serving path; until it has two samples (after ``reset`` too) it says spare. ``idle_cores`` above the machine's
    cores less a quarter is capped to that (with a warning): more could never be met."""

    def __init__(
        self,
        idle_cores: float = 0.5,
        busy_cores: float = 0.25,
        interval_s: float = 0.1,
        idle: Callable[[], float] = idle_cpu_seconds,
        serving: Callable[[], float] = lambda: 0.0,
        clock: Any = time.monotonic,
    ) -> None:
        reachable = float(os.cpu_count() or 1) - 0.25  # every core idle but a quarter of one: the agent runs too
        if idle_cores > reachable:  # a limit that can never be met would throttle the shadow for good
            logs.event(log, "shadow.spare_cores_capped", logging.WARNING, asked=idle_cores, capped_to=reachable)
            idle_cores = reachable
        self.idle_limit, self.busy_limit, self.interval_s = idle_cores, busy_cores, interval_s
        self._idle, self._serving, self._clock = idle, serving, clock
        self._at: float | None = None
        self._last: tuple[float | None, float, float] = (None, 0.0, 0.0)
        self._unreadable = self._serving_unreadable = False  # each logged once until a read works again
        self.spare = True
        self.idle_cores = self.serving_cores = 0.0  # the last sample's figures (idle NaN: not measured)
        self.busy_samples = 0  # samples that said busy, all told

    def reset(self) -> bool:
        """Forget the baseline and say spare (no shadow for a while: the next sample must not average over the gap, and
        the next shadow starts on its whole budget, as the first does); True when the answer changed."""
        self._at = None
        changed, self.spare = not self.spare, True
        return changed

    def _idle_seconds(self) -> float | None:
        """The machine's idle seconds; None when not asked (``idle_cores`` 0) or unreadable (a sandbox's /proc: logged
        once until a read works again), and then serving's CPU decides alone."""
        if self.idle_limit <= 0:
            return None
        try:
            idle = self._idle()
        except (OSError, RuntimeError) as exc:
            if not self._unreadable:
                logs.event(log, "shadow.spare_cpu_unreadable", logging.WARNING, reason=str(exc)[:200])
            self._unreadable = True
            return None
        self._unreadable = False
        return idle

    def sample(self, shadow_s: float = 0.0) -> bool:
        """True when the answer changed (a sample is taken at most every ``interval_s``); ``shadow_s``: the seconds the
        shadow has spent, all told."""
        now = self._clock()
        if self._at is not None and now - self._at < self.interval_s:
            return False
        idle = self._idle_seconds()
        try:
            serving = self._serving()
        except (OSError, RuntimeError) as exc:  # serving's clocks unreadable: keep the last answer, start afresh
            if not self._serving_unreadable:
                logs.event(log, "shadow.serving_cpu_unreadable", logging.WARNING, reason=str(exc)[:200])
            self._serving_unreadable, self._at = True, None
            return False
        self._serving_unreadable = False
        at, (last_idle, last_serving, last_shadow) = self._at, self._last
        self._at, self._last = now, (idle, serving, shadow_s)
        if at is None:
            return False
        span = now - at
        if idle is None or last_idle is None:  # not asked, or unreadable: serving's own CPU decides alone
            self.idle_cores = float("nan")
            idle_enough = True
        else:
            self.idle_cores = (idle - last_idle + shadow_s - last_shadow) / span
            idle_enough = self.idle_cores >= self.idle_limit
        self.serving_cores = (serving - last_serving) / span
        spare, self.spare = self.spare, idle_enough and self.serving_cores < self.busy_limit
        self.busy_samples += not self.spare
        return spare != self.spare


# model, shadow version, inputs, the active model's outputs and seconds, the budget's reservation
_Queued = tuple[str, str, Mapping[str, object], dict[str, np.ndarray], float, float]


class ShadowRunner:
    def __init__(
        self,
        host: ModelHost,
        queue_size: int = 16,
        rtol: float = 0.01,
        atol: float = 1e-3,
        budget: float = 0.1,
        spare: SpareCpu | None = None,
    ) -> None:
        self.host, self.rtol, self.atol = host, rtol, atol
        self._budget = CpuBudget(budget)
        self._spare = spare or SpareCpu()
        self._queue: queue.Queue[_Queued | None] = queue.Queue(queue_size)
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="shadow", daemon=True)

    def start(self) -> ShadowRunner:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def healthy(self) -> bool:
        return self._thread.is_alive()

    def offer(self, active: ServingModel, inputs: Mapping[str, object], outputs: dict[str, np.ndarray], active_s: float) -> None:
        """From the serving path, after the active model answered: queue the comparison, or count it skipped."""
        shadow = self.host.shadow(active.name)
        if shadow is None:
            return
        with self._lock:  # most calls end here, sampled out: one lock, no exception (this runs on every answer)
            reserved = self._budget.admit()
            if reserved is None:
                self._window(active.name, shadow.version).skipped += _rows_of(outputs)
                return
        try:
            self._queue.put_nowait((active.name, shadow.version, inputs, outputs, active_s, reserved))
        except queue.Full:
            with self._lock:
                self._budget.cancel(reserved)
                self._window(active.name, shadow.version).skipped += _rows_of(outputs)

    def _follow_spare_cpu(self) -> None:
        """Sample the spare CPU while a shadow is loaded (none: nothing to throttle, and no reason to read /proc).
        Whatever goes wrong here costs the throttle one sample, never the thread (its death stops the watchdog)."""
        try:
            changed = self._spare.reset() if not self.host.has_shadows() else self._spare.sample(self._budget.spent_s)
            if changed:
                with self._lock:
                    self._budget.throttle(busy=not self._spare.spare)
        except Exception as exc:
            logs.event(log, "shadow.spare_cpu_failed", logging.ERROR, reason=f"{type(exc).__name__}: {exc}"[:300])

    def _window(self, model: str, version: str) -> _Window:
        w = self._windows.get(model)
        if w is None or w.version != version:
            w = self._windows[model] = _Window(version)
        return w

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._spare.interval_s if self.host.has_shadows() else 1.0)
            except queue.Empty:
                self._follow_spare_cpu()
                continue
            self._follow_spare_cpu()
            if item is None:
                self._queue.task_done()
                return
            model, version, inputs, outputs, active_s, reserved = item
            started = time.perf_counter()
            try:
                self._compare(model, version, inputs, outputs, active_s)
            finally:
                spent = time.perf_counter() - started  # wall time: waiting for a busy core counts, so it yields more
                with self._lock:
                    self._budget.spend(spent, reserved)
                self._queue.task_done()

    def _compare(self, model: str, version: str, inputs: Mapping[str, object], active_out: dict[str, np.ndarray], active_s: float) -> None:
        try:
            ran = self.host.infer_shadow(model, version, inputs)
        except Exception as exc:  # the candidate failing is a finding, not a crash
            with self._lock:
                self._window(model, version).errors += 1
            logs.event(log, "shadow.inference_failed", logging.WARNING, model=model, version=version, reason=str(exc)[:300])
            return
        if ran is None:
            return  # the shadow went away (removed or promoted) meanwhile
        shadow_out, shadow_s = ran
        try:
            c = compare_outputs(active_out, shadow_out, self.rtol, self.atol)
        except Exception as exc:  # a comparison bug must cost one comparison, never the thread
            logs.event(log, "shadow.compare_failed", logging.ERROR, model=model, reason=f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            w = self._window(model, version)
            w.kind = c.kind
            w.compared += c.rows
            w.agreed += c.agreed
            w.abs_diff_sum += c.abs_diff_sum
            w.values += c.values
            w.mismatched += int(c.mismatched)
            w.shadow_ms.append(shadow_s * 1e3)
            w.active_ms.append(active_s * 1e3)

    def take(self) -> dict[str, dict[str, Any]]:
        """Per model, the shadow's comparison over the window since the last take (for telemetry)."""
        with self._lock:
            windows, self._windows = self._windows, {}
        return {model: w.to_json() for model, w in windows.items()}

    def idle(self) -> bool:
        """Nothing queued and nothing being compared (an empty queue alone misses the call in hand)."""
        return self._queue.unfinished_tasks == 0
