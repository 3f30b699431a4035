"""Run a variant on its own runtime and compare it with the source's answers, output by output.

Tolerances are absolute errors scaled by each output's magnitude (effective
tolerance ``atol * max(1, max|reference|)``), so one default fits logits and
probabilities alike; the effective number is the one recorded and printed, since
it is what an error must be read against (0.1 becomes 16.2 for outputs up to 162).
Top-1 agreement applies only to outputs that look like class scores — 2-D
``[batch, classes]`` logits or probabilities (``looks_like_class_scores``) — never
to regressions, boxes, masks or states, where an argmax means nothing. A variant runs on the
runtime the registry names as its format's reference reader
(``Runtime.reference_for``), warmed up with the samples themselves: a model may
refuse the all-ones shapes a synthetic warm-up would feed it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Literal

import numpy as np

from agent.bundle import OutputParity, Parity, TensorSignature
from agent.runtimes import runtime_for_format
from converters import samples as sample_io

__all__ = ["DEFAULT_ATOL", "DEFAULT_MIN_TOP1", "compare", "failure", "looks_like_class_scores", "run_variant", "worst_output"]

DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 1e-2, "int8": 1e-1}
DEFAULT_MIN_TOP1 = {"fp32": 0.99, "fp16": 0.98, "int8": 0.9}
LATENCY_RUNS = 20


_REGRESSION_NAMES = re.compile(r"landmark|keypoint|point|box|coord|offset|regress|depth|mask|pose|state", re.IGNORECASE)
_CLASS_NAMES = re.compile(r"logit|prob|class|label|cls", re.IGNORECASE)


def looks_like_class_scores(ref: np.ndarray, batch_axis: int | None = 0, name: str = "") -> bool:
    """A 2-D ``[batch, classes]`` float output with at least two classes that reads as logits or probabilities.

    Probabilities (rows in [0, 1] summing to 1) and outputs named like scores are class scores; outputs named like
    regressions (landmarks, boxes, masks, states) are not. Otherwise logits: a linear layer's class scores take both
    signs, while coordinates in pixels or in [0, 1] keep one sign, so a one-signed output is read as values.
    """
    if not (ref.ndim == 2 and batch_axis == 0 and ref.shape[1] >= 2 and ref.dtype.kind == "f" and ref.size):
        return False
    if ref.min() >= 0 and ref.max() <= 1 and np.allclose(ref.sum(axis=1), 1.0, atol=1e-3):
        return True
    if _REGRESSION_NAMES.search(name):
        return False
    return bool(_CLASS_NAMES.search(name)) or bool(ref.min() < 0 < ref.max())


def _one(name: str, got: np.ndarray, ref: np.ndarray, axis: int | None, precision: str, atol: float) -> OutputParity:
    """One output's errors against its effective tolerance; top-1 for class scores."""
    kind: Literal["class_scores", "values"] = "class_scores" if looks_like_class_scores(ref, axis, name) else "values"
    effective = atol * max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    if got.shape != ref.shape:
        return OutputParity(kind=kind, max_abs_error=float("inf"), mean_abs_error=float("inf"), atol=effective, passed=False)
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_err = float(err.max()) if err.size else 0.0
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean()) if kind == "class_scores" else None
    passed = max_err <= effective and (top1 is None or top1 >= DEFAULT_MIN_TOP1[precision])
    return OutputParity(
        kind=kind,
        max_abs_error=max_err,
        mean_abs_error=float(err.mean()) if err.size else 0.0,
        atol=effective,
        top1_agreement=top1,
        passed=passed,
    )


def compare(
    outputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    precision: str,
    atol: float | None = None,
    tensors: list[TensorSignature] | None = None,
) -> Parity:
    """Per-output parity and its summary; ``atol`` is the configured tolerance (recorded as such in ``Parity.atol``)."""
    atol = DEFAULT_ATOL[precision] if atol is None else atol
    axes = {t.name: t.batch_axis for t in tensors or []}
    per = {name: _one(name, outputs[name], ref, axes.get(name, 0), precision, atol) for name, ref in reference.items()}
    sizes = {name: ref.size for name, ref in reference.items()}
    total = sum(sizes.values())
    top1s = [p.top1_agreement for p in per.values() if p.top1_agreement is not None]
    first = next(iter(reference))
    axis = axes.get(first, 0)
    return Parity(
        max_abs_error=max(p.max_abs_error for p in per.values()),
        mean_abs_error=sum(p.mean_abs_error * sizes[n] for n, p in per.items()) / max(total, 1),
        top1_agreement=min(top1s) if top1s else None,
        samples=int(reference[first].shape[axis]) if axis is not None and reference[first].ndim > axis else 1,
        atol=atol,
        min_top1=DEFAULT_MIN_TOP1[precision] if top1s else None,
        passed=all(p.passed for p in per.values()),
        outputs=per,
    )


def worst_output(parity: Parity) -> str:
    """The output that carries the error: the one furthest outside (or closest to) its effective tolerance."""

    def badness(item: tuple[str, OutputParity]) -> float:
        p = item[1]
        top1_miss = 0.0 if p.top1_agreement is None else (1.0 - p.top1_agreement) * 100
        return max(p.max_abs_error / max(p.atol, 1e-30), top1_miss)

    return max(parity.outputs.items(), key=badness)[0]


def failure(parity: Parity) -> str:
    """Why a variant misses parity, per failing output, with the effective tolerance and what it was scaled from."""
    parts = []
    for name, p in parity.outputs.items():
        if p.passed:
            continue
        scale = f" = {parity.atol:g} x {p.atol / parity.atol:.3g}" if parity.atol and abs(p.atol - parity.atol) > 1e-12 else ""
        text = f"output {name!r}: max abs error {p.max_abs_error:.3g} (tolerance {p.atol:.3g}{scale})"
        if p.top1_agreement is not None:
            text += f", top-1 {p.top1_agreement:.1%} (minimum {parity.min_top1:.0%})"
        parts.append(text)
    return "; ".join(parts) or f"max abs error {parity.max_abs_error:.3g}"


def run_variant(
    path: Path, fmt: str, samples: dict[str, np.ndarray], inputs: list[TensorSignature], outputs: list[TensorSignature]
) -> tuple[dict[str, np.ndarray], float, str]:
    """(answers for all samples, median single-sample latency in ms, runtime version).

    All samples go in one run when every batched input's batch dimension is dynamic in the variant (a variant may
    have fixed shapes the source left open), else one sample per run.
    """
    with runtime_for_format(fmt)() as rt:
        rt.load(path, "CPU")
        specs = {s.name: s for s in rt.inputs}
        batched = [t for t in inputs if t.batch_axis is not None and t.name in specs]
        dynamic = bool(batched) and all(specs[t.name].shape[t.batch_axis] < 0 for t in batched)  # type: ignore[index]
        size = sample_io.count(samples, inputs) if dynamic else 1
        runs = sample_io.batches(samples, inputs, size)
        rt.infer(runs[0])  # warm-up, with shapes the model accepts
        parts = [rt.infer(b) for b in runs]
        one = sample_io.take(samples, inputs, 0, 1)
        times = []
        for _ in range(LATENCY_RUNS):
            t0 = time.perf_counter()
            rt.infer(one)
            times.append(time.perf_counter() - t0)
        version = rt.describe().runtime_version
    return sample_io.concat(parts, outputs), float(np.median(times) * 1e3), version
