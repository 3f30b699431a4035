"""What every benchmark shares: interleaved timing, machine facts, JSON + table output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def per_call_seconds(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def interleaved(contenders: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, float]:
    """Median per-call seconds of each contender, alternating them round by round.

    Why interleave: on a shared 2-core machine the background load drifts; timing
    A then B in separate blocks turns that drift into a fake difference.
    """
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
