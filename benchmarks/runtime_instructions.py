"""What ``Runtime.infer()`` adds over the plain calls, in CPU instructions: a figure the machine's load cannot move.

The timed benchmark (``runtime_overhead``) is what the goals are judged on, but on a
shared 2-core machine its spread can hide a change of a few percent. Here each call
runs under ``valgrind --tool=callgrind``, which counts the instructions executed
(deterministic, whatever else runs): ours and every plain way of calling the same
loaded model (the candidates of ``runtime_overhead``), each inside its own ``itertools``
C function so that callgrind's ``--toggle-collect`` counts that variant's calls alone.
One thread per runtime, so no worker thread's spinning is counted. Instructions are not
time (a cache miss costs no instructions), so this is the check on a change, not the goal.

Needs ``valgrind``; takes ~2 minutes a row. Not part of ``python -m benchmarks``.

Run: ``python -m benchmarks.runtime_instructions [--only onnx litert]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from itertools import accumulate, dropwhile, filterfalse, repeat, starmap, takewhile
from pathlib import Path
from typing import Any

from benchmarks.common import report

# One C function per variant: callgrind counts the calls made inside each.
DRIVERS: dict[str, Callable[[Callable[[], object], int], object]] = {
    "starmap_next": lambda f, n: collections.deque(starmap(f, repeat((), n)), maxlen=0),
    "filterfalse_next": lambda f, n: collections.deque(filterfalse(lambda _: (f(), False)[1], repeat(None, n)), maxlen=0),
    "takewhile_next": lambda f, n: collections.deque(takewhile(lambda _: (f(), True)[1], repeat(None, n)), maxlen=0),
    "dropwhile_next": lambda f, n: collections.deque(dropwhile(lambda _: (f(), True)[1], repeat(None, n)), maxlen=0),
    "accumulate_next": lambda f, n: collections.deque(accumulate(repeat(None, n + 1), lambda a, b: f()), maxlen=0),
}
CALLS = {"tiny": 1000, "medium": 200}
THREADS = {"onnx": {"intra_op_threads": 1}, "litert": {"num_threads": 1}, "openvino": {"num_threads": 1}}


def child(runtime: str, path: str, calls: int, out: str) -> None:
    """Inside valgrind: load, warm, then each variant's calls inside its own driver; which driver ran what goes to ``out``."""
    import numpy as np

    from agent.runtimes import get_runtime
    from benchmarks.runtime_overhead import RAW

    rt = get_runtime(runtime)()
    rt.load(path, device="CPU" if runtime == "openvino" else None, options=THREADS[runtime])
    rt.warmup()
    x = np.random.default_rng(0).standard_normal((1, rt.inputs[0].shape[1])).astype(np.float32)
    feed = {rt.inputs[0].name: x}
    variants = {"ours": lambda: rt.infer(feed), **RAW[runtime](rt, x)}
    plan = dict(zip(variants, DRIVERS))
    for name, driver in plan.items():
        for _ in range(20):
            variants[name]()
        DRIVERS[driver](variants[name], calls)
    Path(out).write_text(json.dumps(plan))


def _row(runtime: str, model: str, path: Path, work: Path) -> dict[str, Any]:
    calls = CALLS[model]
    out, profile = work / f"{runtime}-{model}.json", work / f"{runtime}-{model}.cg"
    toggles = [f"--toggle-collect={d}" for d in DRIVERS]
    cmd = ["valgrind", "--tool=callgrind", *toggles, f"--callgrind-out-file={profile}"]
    cmd += [sys.executable, "-m", "benchmarks.runtime_instructions", "--child", runtime, str(path), str(calls), str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
    annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(profile)], check=True, capture_output=True, text=True)
    totals = {m.group(2): int(m.group(1).replace(",", "")) for m in re.finditer(r"^\s*([\d,]+) .*?:(\w+_next) ", annotated.stdout, re.M)}
    per_call = {name: totals.get(driver, 0) / calls for name, driver in json.loads(out.read_text()).items()}
    ours = per_call.pop("ours")
    best = min(per_call, key=lambda k: per_call[k])
    return {"runtime": runtime, "model": model, "ours": ours, "raw_kind": best, "raw": per_call[best], "raws": per_call}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(THREADS), help="only these runtimes")
    ap.add_argument("--child", nargs=4, metavar=("RUNTIME", "PATH", "CALLS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        runtime, path, calls, out = args.child
        child(runtime, path, int(calls), out)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    from benchmarks.runtime_overhead import MODELS, _model_files

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for model, widths in MODELS.items():
            files = _model_files(Path(d), model, widths)
            for runtime in args.only or sorted(THREADS):
                print(f"{runtime} {model} under callgrind…", flush=True)
                rows.append(_row(runtime, model, files[runtime], Path(d)))
    headers = ["runtime", "model", "fewest-instruction plain call", "raw instr/call", "ours instr/call", "added", "ratio"]
    cells = []
    for r in rows:
        added, ratio = r["ours"] - r["raw"], r["ours"] / r["raw"]
        cells.append([r["runtime"], r["model"], r["raw_kind"], f"{r['raw']:,.0f}", f"{r['ours']:,.0f}", f"{added:,.0f}", f"{ratio:.3f}"])
    report("runtime_instructions", headers, cells, {"rows": rows})


if __name__ == "__main__":
    main()
