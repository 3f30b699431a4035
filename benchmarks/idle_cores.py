"""What a runtime's threads cost the device between requests: CPU per call when requests come apart, and back to back.

ONNX Runtime's worker threads busy-wait for the next parallel section by default; OpenVINO's CPU plugin keeps its
threads awake between calls too. An agent whose requests come a few hundred microseconds apart then takes a whole
core from the application it serves. The agent bounds ONNX Runtime's spinning (``spin_us = 20``: a worker waits that
long for the next section, then sleeps), which keeps the sections of one call from waking a sleeping worker each
time without spinning between requests; a second row sets it against never spinning (``spin_us = 0``, the agent's
default before 2026-12-05). OpenVINO has no such switch, and ``num_threads = 1`` is the option that keeps it to one
core.

Rows, on the medium model of ``runtime_overhead`` (512-wide MLP) through ``Runtime.infer``, two loaded copies
in one process: the runtime's own default (baseline) against the setting named in the row (subject), in alternating
rounds (pairs). A round is ``CALLS`` calls, each followed by a ``GAP_S`` pause (the process CPU time per call and the
mean call time are taken), then ``CALLS`` back to back (time per call). Between rounds the process rests
``SETTLE_S`` so that the threads of one side have stopped spinning before the other side is measured.
No goal: figures to choose settings by, for the machine it runs on.

Run: ``python -m benchmarks.idle_cores [--quick] [--repeat N]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtimes import Runtime, get_runtime, probe_all
from benchmarks.common import Paired, Plan, arguments, pairs, report
from benchmarks.runtime_overhead import MODELS, _model_files

CALLS, GAP_S, SETTLE_S = 100, 0.0003, 0.05
QUICK = Plan(min_pairs=3, max_pairs=5, budget_s=3.0)
FULL = Plan(min_pairs=5, max_pairs=11, budget_s=6.0)
# (runtime, what the row calls the baseline, its options, what it calls the subject, its options)
ROWS: list[tuple[str, str, dict[str, Any], str, dict[str, Any]]] = [
    ("onnx", "onnxruntime's own spin (its default)", {"allow_spinning": True}, "spin_us = 20 (the agent's default)", {}),
    ("onnx", "spin_us = 0 (never spins)", {"spin_us": 0}, "spin_us = 20 (the agent's default)", {}),
    ("openvino", "all cores (OpenVINO's default)", {}, "num_threads = 1", {"num_threads": 1}),
]


def _round(rt: Runtime, feed: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """(CPU µs per call with a pause after each, µs per call with that pause, µs per call back to back)."""
    time.sleep(SETTLE_S)
    spent = 0.0
    cpu0 = time.process_time()
    for _ in range(CALLS):
        t0 = time.perf_counter()
        rt.infer(feed)
        spent += time.perf_counter() - t0
        time.sleep(GAP_S)
    cpu = (time.process_time() - cpu0) / CALLS * 1e6
    t0 = time.perf_counter()
    for _ in range(CALLS):
        rt.infer(feed)
    return cpu, spent / CALLS * 1e6, (time.perf_counter() - t0) / CALLS * 1e6


def _measure(row: tuple[str, str, dict[str, Any], str, dict[str, Any]], path: Path, x: np.ndarray, plan: Plan) -> dict[str, Any]:
    runtime, base_label, base_opts, subj_label, subj_opts = row
    loaded = []
    for opts in (base_opts, subj_opts):
        rt = get_runtime(runtime)()
        rt.load(path, device="CPU" if runtime == "openvino" else None, options=opts)
        rt.warmup()
        loaded.append(rt)
    feed = {loaded[0].inputs[0].name: x}
    rounds: list[tuple[tuple[float, float, float], tuple[float, float, float]]] = []

    def pair(i: int) -> tuple[float, float]:
        order = loaded if i % 2 == 0 else loaded[::-1]
        first, second = (_round(rt, feed) for rt in order)
        b, s = (first, second) if i % 2 == 0 else (second, first)
        rounds.append((b, s))
        return b[0], s[0]

    cpu = pairs(pair, plan)
    for rt in loaded:
        rt.close()
    spaced = Paired(tuple(b[1] for b, _ in rounds), tuple(s[1] for _, s in rounds))
    b2b = Paired(tuple(b[2] for b, _ in rounds), tuple(s[2] for _, s in rounds))
    return {"runtime": runtime, "baseline": base_label, "subject": subj_label, "cpu": cpu, "spaced": spaced, "back_to_back": b2b}


def main(argv: list[str] | None = None) -> int:
    ap, plan_of = arguments(__doc__.splitlines()[0], QUICK, FULL)
    plan = plan_of(ap.parse_args(argv))
    probes = probe_all()
    widths = MODELS["medium"]
    x = np.random.default_rng(0).standard_normal((1, widths[0])).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        files = _model_files(Path(d), "medium", widths)
        for row in ROWS:
            runtime = row[0]
            if not probes[runtime].available:
                print(f"skip {runtime}: {probes[runtime].reason}", file=sys.stderr)
                continue
            rows.append(_measure(row, files[runtime], x, plan))
    headers = ["runtime", "baseline", "subject", "CPU µs/call, 0.3 ms apart: baseline / subject", "ratio", "spread [min, max]"]
    headers += ["call µs 0.3 ms apart: baseline / subject", "ratio", "back to back µs: baseline / subject", "ratio", "pairs"]
    cells = []
    for r in rows:
        cpu, spaced, b2b = r["cpu"], r["spaced"], r["back_to_back"]
        cells.append(
            [
                r["runtime"],
                r["baseline"],
                r["subject"],
                f"{cpu.baseline_median:.0f} / {cpu.subject_median:.0f}",
                *cpu.cells(),
                f"{spaced.baseline_median:.0f} / {spaced.subject_median:.0f}",
                spaced.cells()[0],
                f"{b2b.baseline_median:.0f} / {b2b.subject_median:.0f}",
                b2b.cells()[0],
                str(len(cpu.ratios)),
            ]
        )
    payload = {
        "plan": plan.__dict__,
        "calls_per_round": CALLS,
        "gap_s": GAP_S,
        "rows": [{k: (v.to_json() if isinstance(v, Paired) else v) for k, v in r.items()} for r in rows],
    }
    report("idle_cores", headers, cells, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
