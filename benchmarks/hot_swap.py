"""Hot swap under load: requests keep flowing while a new model version replaces the old one.

Two client threads call ``ModelHost.infer`` without pause on a 64→128→128→10 MLP (ONNX
Runtime). After a steady phase, the new version is loaded and warmed beside the old one
(as the installer does) and swapped in. Baseline: the steady phase's p99 in the same run.
Goals (issue 7): zero failed requests; p99 during the swap (from the start of loading
the new version to 0.5 s after the switch) at most 2x the steady p99.

Run: ``python -m benchmarks.hot_swap``.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from agent.runtimes import get_runtime
from agent.serve.host import ModelHost, ServingModel
from benchmarks.common import machine, write
from converters import builders


def _serving(path: Path, version: str) -> ServingModel:
    rt = get_runtime("onnx")()
    rt.load(path)
    rt.warmup()
    return ServingModel("m", version, "onnx-fp32", version, rt)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = [builders.write_onnx_mlp(builders.random_mlp([64, 128, 128, 10], seed=s), Path(tmp) / f"v{s}.onnx") for s in (1, 2)]
        host = ModelHost()
        host.swap(_serving(paths[0], "1"))
        x = {"x": np.random.default_rng(0).uniform(-1, 1, (1, 64)).astype(np.float32)}
        samples: list[tuple[float, float]] = []  # (start, seconds)
        failures: list[BaseException] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    host.infer("m", x)
                except Exception as exc:
                    failures.append(exc)
                samples.append((t0, time.perf_counter() - t0))

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # warm
        steady_from = time.perf_counter()
        time.sleep(3.0)
        swap_from = time.perf_counter()
        host.swap(_serving(paths[1], "2"))  # load + warm beside the old one, switch, drain, close the old one
        swap_to = time.perf_counter() + 0.5
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
    steady = [d for t, d in samples if steady_from <= t < swap_from]
    during = [d for t, d in samples if swap_from <= t < swap_to]
    p99_steady, p99_swap = (float(np.percentile(v, 99)) * 1e3 for v in (steady, during))
    ratio = p99_swap / p99_steady
    row = {
        "requests": len(samples),
        "failed": len(failures),
        "steady_p99_ms": round(p99_steady, 3),
        "swap_p99_ms": round(p99_swap, 3),
        "ratio": round(ratio, 2),
        "swap_window_ms": round((swap_to - swap_from) * 1e3, 1),
        "goal_met": not failures and ratio <= 2.0,
    }
    met = "yes" if row["goal_met"] else "NO"
    md = (
        "| hot swap | failed | p99 during swap ms | steady p99 ms | ratio | goal | met |\n|---|---|---|---|---|---|---|\n"
        f"| {row['requests']} requests, 2 threads | {row['failed']} | {row['swap_p99_ms']} | {row['steady_p99_ms']} | {row['ratio']} "
        f"| 0 failed, <= 2x | {met} |\n"
    )
    print(md)
    paths_out = write("hot_swap", {"machine": machine(), **row}, md)
    print(f"wrote {paths_out[0]} and {paths_out[1]}")


if __name__ == "__main__":
    main()
