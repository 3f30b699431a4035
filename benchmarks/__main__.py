"""``python -m benchmarks``: every benchmark, then one table of every figure against its baseline.

Each benchmark writes ``benchmarks/results/NAME.json`` and ``NAME.md``; this runs them in
turn (each in its own process, so one's imports and threads do not bend another's
numbers) and writes ``benchmarks/results/summary.md`` from their tables.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks.common import RESULTS, machine

BENCHMARKS = ["runtime_overhead", "idle_cores", "serving", "transfer", "rollout", "hot_swap", "footprint", "scale", "broker_cluster"]
# On the paired harness of benchmarks/common.py: they take --quick and --repeat N.
PAIRED = {"runtime_overhead", "idle_cores", "transfer", "hot_swap", "footprint", "serving"}
QUICK = PAIRED | {"serving", "scale", "rollout", "broker_cluster"}  # the benchmarks with a shorter --quick run
# The suite's full run takes scale at 1,000 devices: at its own default (10,000) the two rollouts alone take longer
# than the suite's 15-minute goal on a 2-core box; that figure is ``python -m benchmarks.scale`` on its own.
FULL_ARGS = {"scale": ["--devices", "1000", "--messages", "20000"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these")
    ap.add_argument("--quick", action="store_true", help="shorter runs where a benchmark has them")
    ap.add_argument("--repeat", type=int, default=1, metavar="N", help="N times the pairs of the paired benchmarks")
    args = ap.parse_args()
    failed = []
    for name in args.only or BENCHMARKS:
        extra = ["--quick"] if args.quick and name in QUICK else ([] if args.quick else FULL_ARGS.get(name, []))
        if name in PAIRED and args.repeat > 1:
            extra += ["--repeat", str(args.repeat)]
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *extra])
        print(f"== {name}: exit {done.returncode} in {time.monotonic() - t0:.0f} s", flush=True)
        if done.returncode:
            failed.append(name)
    m = machine()
    parts = [
        f"# edgefleet benchmarks\n\nMachine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['arch']}, Python {m['python']}.\n"
    ]
    for name in BENCHMARKS:
        md = RESULTS / f"{name}.md"
        if md.exists():
            parts.append(f"## {name}\n\n{md.read_text()}")
    (RESULTS / "summary.md").write_text("\n".join(parts))
    print(f"wrote {RESULTS / 'summary.md'}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
