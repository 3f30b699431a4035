"""What every benchmark shares: paired alternating rounds, machine facts, JSON + table output.

Why pairs: this project is measured on a shared 2-core machine whose background load
drifts by ±50% within seconds. Timing a baseline then a subject in two long blocks turns
that drift into a fake difference, and one median of each drifts between runs. So a
benchmark runs the baseline and the subject in short alternating rounds (A B, B A, A B …),
takes the ratio within each pair (both halves saw nearly the same machine), and reports
the median ratio with its spread; a goal is judged on the median. ``--repeat N`` runs N
times the pairs (and time budget) for a tighter figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


# -- timing -------------------------------------------------------------------------------------


def per_call_seconds(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def interleaved(contenders: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, float]:
    """Median per-call seconds of each contender, alternating them round by round (kept for benchmarks not yet on pairs)."""
    for fn in contenders.values():
        per_call_seconds(fn, max(1, calls // 10))  # warm caches and lazy paths
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(rounds):
        order = list(contenders.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            samples[name].append(per_call_seconds(fn, calls))
    return {k: statistics.median(v) for k, v in samples.items()}


def fastest(candidates: dict[str, Callable[[], object]], calls: int, rounds: int = 5) -> tuple[str, dict[str, float]]:
    """The fastest of several ways to do the baseline (interleaved medians), and each one's per-call seconds.

    Why pick first and pair after: taking the per-round minimum of several baselines
    would bias the baseline low by the noise alone."""
    times = interleaved(candidates, calls, rounds)
    return min(times, key=lambda k: times[k]), times


# -- pairs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How many pairs to run and for how long at most: ``min_pairs`` always, then until ``max_pairs`` or the budget."""

    min_pairs: int
    max_pairs: int
    budget_s: float

    def scaled(self, repeat: int) -> Plan:
        return Plan(self.min_pairs * repeat, self.max_pairs * repeat, self.budget_s * repeat)


@dataclass(frozen=True)
class Paired:
    """Per-pair values of a baseline and a subject, and their ratios (subject / baseline)."""

    baseline: tuple[float, ...]
    subject: tuple[float, ...]
    seconds: float = 0.0  # wall time the pairs took

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(s / b for b, s in zip(self.baseline, self.subject))

    @property
    def ratio(self) -> float:
        """The median per-pair ratio: what a goal is judged on."""
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        """Half the interquartile range of the per-pair ratios (±), 0 with fewer than 2 pairs."""
        r = self.ratios
        if len(r) < 2:
            return 0.0
        q = statistics.quantiles(r, n=4, method="inclusive")
        return (q[2] - q[0]) / 2

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline)

    @property
    def subject_median(self) -> float:
        return statistics.median(self.subject)

    def to_json(self) -> dict[str, Any]:
        r = self.ratios
        return {
            "pairs": len(r),
            "ratio_median": self.ratio,
            "ratio_spread": self.spread,
            "ratio_min": min(r),
            "ratio_max": max(r),
            "baseline_median": self.baseline_median,
            "subject_median": self.subject_median,
            "ratios": list(r),
            "baseline": list(self.baseline),
            "subject": list(self.subject),
            "seconds": round(self.seconds, 2),
        }

    def cells(self, digits: int = 3) -> tuple[str, str]:
        """(the median ratio, "±spread [min, max]") for a table."""
        r = self.ratios
        return f"{self.ratio:.{digits}f}", _spread(self.spread, min(r), max(r), digits)


def spread_cell(paired: Mapping[str, Any], digits: int = 3) -> str:
    """ "±spread [min, max]" of a ``Paired.to_json()`` (a table made from a benchmark's JSON rows)."""
    return _spread(paired["ratio_spread"], paired["ratio_min"], paired["ratio_max"], digits)


def _spread(spread: float, low: float, high: float, digits: int) -> str:
    return f"±{spread:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def pairs(pair: Callable[[int], tuple[float, float]], plan: Plan) -> Paired:
    """Run ``pair(i)`` -> (baseline, subject) for i = 0, 1, … as the plan allows."""
    base: list[float] = []
    subj: list[float] = []
    t0 = time.monotonic()
    while len(base) < plan.max_pairs and (len(base) < plan.min_pairs or time.monotonic() - t0 < plan.budget_s):
        b, s = pair(len(base))
        base.append(b)
        subj.append(s)
    return Paired(tuple(base), tuple(subj), time.monotonic() - t0)


def alternating(baseline: Callable[[], float], subject: Callable[[], float]) -> Callable[[int], tuple[float, float]]:
    """A pair function running the baseline first in even pairs and the subject first in odd ones (A B, B A, …):
    a cost that falls on whichever runs second (a cache the other warmed, a collector pass) lands on both alike."""

    def pair(i: int) -> tuple[float, float]:
        if i % 2:
            s = subject()
            return baseline(), s
        b = baseline()
        return b, subject()

    return pair


def paired_rounds(round_of: Callable[[bool], tuple[float, float]], plan: Plan) -> tuple[Paired, Paired]:
    """Pairs of rounds that each give two figures (requests/s and p50, say): ``round_of(False)`` runs the baseline's
    round, ``round_of(True)`` the subject's, alternating as ``alternating`` does, as the plan allows. Returns the
    pairs of the first figure and those of the second, taken in the same rounds."""
    second: dict[bool, list[float]] = {False: [], True: []}

    def side(subject: bool) -> float:
        a, b = round_of(subject)
        second[subject].append(b)
        return a

    first = pairs(alternating(lambda: side(False), lambda: side(True)), plan)
    return first, Paired(tuple(second[False]), tuple(second[True]), first.seconds)


def timed_rounds(sides: Sequence[Callable[[], object]], calls: int, plan: Plan) -> tuple[list[tuple[float, ...]], float]:
    """Per-call seconds of several functions, every one of them in every round, as the plan allows; one tuple per
    function (its figure of each round) and the seconds the rounds took. ``Paired(a, b)`` of any two is then a pair per
    round.

    The order moves every round: reversed in odd rounds (A B, B A, as ``alternating``), and rotated by one every two
    rounds, so with three sides the six rounds run all six orders and none of them is always in the middle or always
    after the same one. Why all in one round rather than two sets of pairs: a ratio between two subjects each
    paired with the same baseline would come from different rounds, on a machine whose load moves within seconds."""
    if not sides:
        raise ValueError("timed_rounds needs at least one function")
    for fn in sides:
        per_call_seconds(fn, max(1, calls // 4))
    n = len(sides)
    columns: list[list[float]] = [[] for _ in sides]
    t0 = time.monotonic()
    while len(columns[0]) < plan.max_pairs and (len(columns[0]) < plan.min_pairs or time.monotonic() - t0 < plan.budget_s):
        r = len(columns[0])
        order = [(k + r // 2) % n for k in range(n)]
        for i in reversed(order) if r % 2 else order:
            columns[i].append(per_call_seconds(sides[i], calls))
    return [tuple(c) for c in columns], time.monotonic() - t0


# -- command line ------------------------------------------------------------------------------


def arguments(description: str, quick: Plan, full: Plan) -> tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], Plan]]:
    """A parser with ``--quick`` and ``--repeat N``, and the function that turns its answers into a plan."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="fewer pairs and a shorter time budget")
    ap.add_argument("--repeat", type=int, default=1, metavar="N", help="N times the pairs and time budget (a tighter figure)")

    def plan(args: argparse.Namespace) -> Plan:
        return (quick if args.quick else full).scaled(max(1, args.repeat))

    return ap, plan


# -- output -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from agent.hardware import detect

    p = detect()
    return {
        "cpu": p.cpu.model,
        "cores": p.cpu.cores,
        "arch": p.arch,
        "python": platform.python_version(),
        "memory_gib": round(p.memory_bytes / 2**30, 1),
    }


def write(name: str, payload: dict[str, Any], table_md: str, directory: Path = RESULTS) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{name}.json"
    md_path = directory / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(table_md)
    return json_path, md_path


def yes_no(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "NO")


def report(name: str, headers: Sequence[str], cells: Sequence[Sequence[str]], payload: dict[str, Any]) -> None:
    """Print ``cells`` as a table under ``headers`` and write ``results/NAME.json`` (``payload`` plus the machine) and
    ``NAME.md`` (the same table in markdown)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=200)
    table = Table(*(escape(h) for h in headers), title=name.replace("_", " "))
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in cells:
        table.add_row(*(escape(c) for c in row))
        md.append("| " + " | ".join(row) + " |")
    console.print(table)
    info = machine()
    paths = write(name, {"benchmark": name, "machine": info, **payload}, "\n".join(md) + "\n")
    console.print(f"wrote {paths[0]} and {paths[1]}")
