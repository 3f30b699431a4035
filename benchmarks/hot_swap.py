"""Hot swap under load: requests keep flowing while a new model version replaces the old one.

Two client threads call ``ModelHost.infer`` without pause on a 64→128→128→10 MLP (ONNX
Runtime). Each pair is a steady window (baseline: its p99) and a swap window (from the
start of loading the next version beside the old one, as the installer does, to 0.5 s
after the switch: its p99), steady first in even pairs and after the swap in odd ones;
the ratio is taken per pair. Goals (issue 7): zero failed requests; a median p99 during
the swap at most 2x the steady p99.

Run: ``python -m benchmarks.hot_swap [--quick] [--repeat N]``.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from agent.runtimes import get_runtime
from agent.serve.host import ModelHost, ServingModel
from benchmarks.common import Plan, arguments, pairs, report, yes_no
from converters import builders

QUICK = Plan(min_pairs=5, max_pairs=7, budget_s=25.0)
FULL = Plan(min_pairs=11, max_pairs=31, budget_s=60.0)
STEADY_S = 1.5
AFTER_SWAP_S = 0.5


def _serving(path: Path, version: str) -> ServingModel:
    rt = get_runtime("onnx")()
    rt.load(path)
    rt.warmup()
    return ServingModel("m", version, "onnx-fp32", version, rt)


class Load:
    """Client threads calling the host without pause, each call's (start, seconds) kept; failures counted."""

    def __init__(self, host: ModelHost, threads: int = 2) -> None:
        self.host = host
        self.samples: list[tuple[float, float]] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._x = {"x": np.random.default_rng(0).uniform(-1, 1, (1, 64)).astype(np.float32)}
        self._threads = [threading.Thread(target=self._client) for _ in range(threads)]

    def _client(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self.host.infer("m", self._x)
            except Exception as exc:
                self.failures.append(exc)
            self.samples.append((t0, time.perf_counter() - t0))

    def p99_ms(self, start: float, end: float) -> float:
        return float(np.percentile([d for t, d in self.samples if start <= t < end], 99)) * 1e3

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def main(argv: list[str] | None = None) -> None:
    ap, plan_of = arguments(__doc__.splitlines()[0], QUICK, FULL)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [builders.write_onnx_mlp(builders.random_mlp([64, 128, 128, 10], seed=s), Path(tmp) / f"v{s}.onnx") for s in (1, 2)]
        host = ModelHost()
        host.swap(_serving(paths[0], "1"))
        versions = itertools.count(2)
        with Load(host) as load:
            time.sleep(0.5)  # warm

            def steady() -> float:
                t0 = time.perf_counter()
                time.sleep(STEADY_S)
                return load.p99_ms(t0, time.perf_counter())

            def swap() -> float:
                v = next(versions)
                t0 = time.perf_counter()
                host.swap(_serving(paths[v % 2], str(v)))  # load + warm beside the old one, switch, drain, close the old one
                end = time.perf_counter() + AFTER_SWAP_S
                time.sleep(AFTER_SWAP_S)
                return load.p99_ms(t0, end)

            def pair(i: int) -> tuple[float, float]:
                if i % 2:
                    s = swap()
                    return steady(), s
                b = steady()
                return b, swap()

            paired = pairs(pair, plan_of(args))
        requests, failed = len(load.samples), len(load.failures)
    met = failed == 0 and paired.ratio <= 2.0
    ratio, spread = paired.cells(2)
    cells = [
        f"{requests} requests, 2 threads, {len(paired.ratios)} swaps",
        str(failed),
        f"{paired.subject_median:.3f}",
        f"{paired.baseline_median:.3f}",
        ratio,
        spread,
        "0 failed, <= 2x",
        yes_no(met),
    ]
    headers = ["hot swap", "failed", "p99 during swap ms", "steady p99 ms", "ratio", "spread [min, max]", "goal", "met"]
    payload = {"requests": requests, "failed": failed, **paired.to_json(), "goal_met": met}
    report("hot_swap", headers, [cells], payload)


if __name__ == "__main__":
    main()
