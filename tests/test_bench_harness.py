"""The benchmarks' paired harness: alternation order, per-pair ratios and their statistics, and the plan's bounds."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from conftest import ModelFiles

from agent.runtimes import get_runtime
from benchmarks.common import Paired, Plan, alternating, paired_rounds, pairs, spread_cell, timed_rounds
from benchmarks.runtime_overhead import FLOOR


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


def test_timed_rounds_run_every_side_in_every_round_in_every_order() -> None:
    # Three sides (raw call, safe floor, ours in runtime_overhead): each round runs all three, so a ratio between any
    # two comes from the same rounds; six rounds run the six orders, so none is always first, last or in the middle.
    order: list[str] = []

    def side(name: str) -> Callable[[], None]:
        return lambda: order.append(name)

    columns, seconds = timed_rounds([side("a"), side("b"), side("c")], calls=1, plan=Plan(min_pairs=6, max_pairs=6, budget_s=60))
    assert order[:3] == ["a", "b", "c"]  # one warm-up call each
    rounds = ["".join(order[i : i + 3]) for i in range(3, len(order), 3)]
    assert rounds == ["abc", "cba", "bca", "acb", "cab", "bac"]
    assert [len(c) for c in columns] == [6, 6, 6] and seconds >= 0
    two, _ = timed_rounds([side("a"), side("b")], 1, Plan(min_pairs=2, max_pairs=50, budget_s=0))
    assert [len(c) for c in two] == [2, 2]  # the plan's minimum, past a spent budget
    with pytest.raises(ValueError, match="at least one"):
        timed_rounds([], 1, Plan(1, 1, 1.0))


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


@pytest.mark.parametrize(("runtime", "suffix"), [("litert", "tflite"), ("openvino", "xml"), ("onnx", "onnx")])
def test_runtime_overhead_safe_floor_answers_as_ours_copies_both_ways_and_refuses_non_finite_input(
    models: ModelFiles, runtime: str, suffix: str
) -> None:
    # The floor is what the benchmark says the safety steps alone cost: it must do those steps, or its ratio to the
    # raw call would understate them (a floor that handed out the runtime's own output buffer, say).
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    rt = get_runtime(runtime)()
    rt.load(models.path(f"mlp.{suffix}"), device="CPU" if runtime == "openvino" else None)
    try:
        floor, buffer = FLOOR[runtime](rt, x)
        # The runtime never holds the caller's array: the floor binds a buffer of its own (LiteRT's set_tensor copies).
        assert (buffer is None) == (runtime == "litert")
        assert buffer is None or not np.shares_memory(buffer, x)
        first = floor()
        assert isinstance(first, np.ndarray)
        np.testing.assert_allclose(first, rt.infer({"x": x})["y"], rtol=1e-6)
        kept = first.copy()
        x[...] = 0  # the caller writes its array again, as a request's buffer is reused: the next call sees it
        second = floor()
        np.testing.assert_allclose(second, rt.infer({"x": x})["y"], rtol=1e-6)
        np.testing.assert_array_equal(first, kept)  # an earlier answer is never written over by a later call
        x[0, 3] = np.nan
        with pytest.raises(ValueError, match="non-finite"):
            floor()
    finally:
        rt.close()
