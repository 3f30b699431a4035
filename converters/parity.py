"""Run a variant on its own runtime and compare it with the source's answers.

Tolerances are absolute errors scaled by the reference's magnitude
(``atol * max(1, max|reference|)``) so one default fits logits and
probabilities alike; top-1 agreement is checked when an output looks like class
scores (2-D, several columns). A variant runs on the runtime the registry names
as its format's reference reader (``Runtime.reference_for``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from agent.bundle import Parity
from agent.runtimes import runtime_for_format
from converters.samples import batches

DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 1e-2, "int8": 1e-1}
DEFAULT_MIN_TOP1 = {"fp32": 0.99, "fp16": 0.98, "int8": 0.9}
LATENCY_RUNS = 20


def looks_like_class_scores(ref: np.ndarray) -> bool:
    return ref.ndim == 2 and ref.shape[1] >= 2 and ref.dtype.kind == "f"


def compare(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], precision: str, atol: float | None = None) -> Parity:
    atol = DEFAULT_ATOL[precision] if atol is None else atol
    max_err, sum_err, count, top1s = 0.0, 0.0, 0, []
    passed = True
    for name, ref in reference.items():
        got = outputs[name].astype(np.float64)
        if got.shape != ref.shape:
            return Parity(max_abs_error=float("inf"), mean_abs_error=float("inf"), samples=int(ref.shape[0]), atol=atol, passed=False)
        err = np.abs(got - ref.astype(np.float64))
        max_err = max(max_err, float(err.max()))
        sum_err += float(err.sum())
        count += err.size
        scale = max(1.0, float(np.abs(ref).max()))
        passed &= float(err.max()) <= atol * scale
        if looks_like_class_scores(ref):
            top1s.append(float((got.argmax(1) == ref.argmax(1)).mean()))
    top1 = min(top1s) if top1s else None
    min_top1 = DEFAULT_MIN_TOP1[precision] if top1 is not None else None
    if top1 is not None and min_top1 is not None:
        passed &= top1 >= min_top1
    n = next(iter(reference.values())).shape[0]
    return Parity(
        max_abs_error=max_err,
        mean_abs_error=sum_err / max(count, 1),
        top1_agreement=top1,
        samples=int(n),
        atol=atol,
        min_top1=min_top1,
        passed=bool(passed),
    )


def run_variant(path: Path, fmt: str, samples: dict[str, np.ndarray], batch_dynamic: bool) -> tuple[dict[str, np.ndarray], float, str]:
    """(outputs for all samples, median single-sample latency in ms, runtime version)."""
    with runtime_for_format(fmt)() as rt:
        rt.load(path, "CPU")
        rt.warmup()
        size = next(iter(samples.values())).shape[0] if batch_dynamic else 1
        parts = [rt.infer(b) for b in batches(samples, size)]
        one = {k: v[:1] for k, v in samples.items()}
        times = []
        for _ in range(LATENCY_RUNS):
            t0 = time.perf_counter()
            rt.infer(one)
            times.append(time.perf_counter() - t0)
        version = rt.describe().runtime_version
    outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return outputs, float(np.median(times) * 1e3), version
