"""The benchmarks' paired harness: alternation order, per-pair ratios and their statistics, and the plan's bounds."""

from __future__ import annotations

import pytest

from benchmarks.common import Paired, Plan, alternating, paired_rounds, pairs, spread_cell


def test_pairs_alternate_which_side_runs_first_and_keep_baseline_and_subject_apart() -> None:
    order: list[str] = []

    def side(name: str, value: float) -> float:
        order.append(name)
        return value

    paired = pairs(alternating(lambda: side("b", 2.0), lambda: side("s", 3.0)), Plan(min_pairs=4, max_pairs=4, budget_s=60))
    assert order == ["b", "s", "s", "b", "b", "s", "s", "b"]
    assert paired.baseline == (2.0,) * 4 and paired.subject == (3.0,) * 4
    assert paired.ratio == 1.5 and paired.spread == 0.0


def test_ratio_is_the_median_of_per_pair_ratios_with_spread_and_range() -> None:
    # Baselines drift 10x between pairs (a loaded machine); the ratio within each pair does not.
    paired = Paired(baseline=(1.0, 10.0, 2.0, 4.0, 1.0), subject=(1.1, 12.0, 2.0, 4.4, 3.0))
    assert paired.ratios == pytest.approx((1.1, 1.2, 1.0, 1.1, 3.0))
    assert paired.ratio == pytest.approx(1.1)
    assert paired.spread == pytest.approx((1.2 - 1.1) / 2)  # half the interquartile range: the outlier does not widen it
    ratio, spread = paired.cells()
    assert ratio == "1.100" and spread == "±0.050 [1.000, 3.000]"
    assert spread_cell(paired.to_json()) == spread  # the same cell when a table is made from the JSON rows
    data = paired.to_json()
    assert data["pairs"] == 5 and data["ratio_min"] == 1.0 and data["ratio_max"] == 3.0


def test_plan_runs_min_pairs_past_the_budget_and_never_more_than_max() -> None:
    assert len(pairs(lambda i: (1.0, 1.0), Plan(min_pairs=3, max_pairs=10, budget_s=0)).ratios) == 3
    assert len(pairs(lambda i: (1.0, 1.0), Plan(min_pairs=3, max_pairs=10, budget_s=60)).ratios) == 10
    assert Plan(3, 10, 5.0).scaled(2) == Plan(6, 20, 10.0)


def test_paired_rounds_keep_both_figures_of_a_round_in_the_same_pair() -> None:
    # Each round gives requests/s and a p50; the p50 pairs must come from the same rounds as the requests/s pairs,
    # in the same alternation (the serving, OIP and local-broker rows all take their figures this way).
    order: list[str] = []
    calls = {False: 0, True: 0}

    def round_of(subject: bool) -> tuple[float, float]:
        order.append("s" if subject else "b")
        calls[subject] += 1
        n = calls[subject]
        return (100.0 * n, 1.0 * n) if not subject else (90.0 * n, 1.5 * n)

    rps, p50 = paired_rounds(round_of, Plan(min_pairs=3, max_pairs=3, budget_s=60))
    assert order == ["b", "s", "s", "b", "b", "s"]
    assert rps.baseline == (100.0, 200.0, 300.0) and rps.subject == (90.0, 180.0, 270.0)
    assert p50.baseline == (1.0, 2.0, 3.0) and p50.subject == (1.5, 3.0, 4.5)
    assert rps.ratio == pytest.approx(0.9) and p50.ratio == pytest.approx(1.5)
    assert p50.seconds == rps.seconds
