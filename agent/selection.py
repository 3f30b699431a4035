"""Choose the runtime, device and model variant for this device.

Why rank then validate: a static policy (hardware x installed runtimes x the
variants a bundle offers) gives a sensible order with a reason for every place,
but only a real load + warm-up + golden sample proves a choice works, so the top
candidate is validated and the next one tried on any failure, each fallback
logged with its cause. A runtime forced in the settings replaces the policy.
The caller's own inputs (``request``) are checked on the loaded model before its
warm-up: a bad input is the caller's ``InvalidInput``, never a fallback.

The policy is not written here: each runtime's file declares its tiers (device,
formats, precisions, reason, place on the shared ``Band`` scale) for a hardware
profile, and ``rank`` merges the registry's tiers in that order. Today that gives:
- NVIDIA GPU or Jetson: TensorRT -> ONNX Runtime (CUDA) -> the CPU order.
- Coral Edge TPU with an ``edgetpu`` variant: LiteRT with the Edge TPU delegate.
- Intel NPU: OpenVINO on the NPU for static-shape variants; Intel GPU: OpenVINO GPU.
- CPU, ARM: LiteRT -> ONNX Runtime -> OpenVINO.
- CPU, x86: OpenVINO (IR) -> ONNX Runtime -> OpenVINO (ONNX) -> LiteRT -> OpenVINO (TFLite).
Within one runtime and device, int8 comes first where the hardware accelerates it
(NPU, Edge TPU, VNNI/AMX, ARM dot-product), fp16 first on GPUs, fp32 otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from agent import logs
from agent.errors import EdgefleetError, HealthCheckFailed, InvalidInput, NoUsableRuntime
from agent.hardware import HardwareProfile
from agent.runtimes import get_runtime, runtime_classes
from agent.runtimes.base import ProbeResult, Runtime, Tier
from agent.runtimes.formats import EDGETPU, ModelFormat, Precision, model_format
from agent.runtimes.golden import GoldenSample
from agent.runtimes.hints import InputHints

__all__ = ["ModelVariant", "Candidate", "Ranking", "Selection", "rank", "select", "choose", "preferred_variants"]

log = logging.getLogger("edgefleet.selection")


class ModelVariant(BaseModel):
    """One file of a model for one runtime family and precision (a bundle lists several)."""

    model_config = ConfigDict(frozen=True)

    path: Path
    format: ModelFormat
    precision: Precision = "fp32"
    hints: frozenset[str] = frozenset()  # e.g. {"edgetpu"}: compiled for the Edge TPU, useless without it
    static_shapes: bool | None = None  # None: unknown (the NPU needs static shapes)

    @classmethod
    def from_path(
        cls, path: str | Path, precision: Precision = "fp32", hints: Iterable[str] = (), static_shapes: bool | None = None
    ) -> ModelVariant:
        p = Path(path)
        hint_set = frozenset(hints) | ({EDGETPU} if p.stem.endswith("_edgetpu") else frozenset())
        return cls(path=p, format=model_format(p), precision=precision, hints=hint_set, static_shapes=static_shapes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Candidate:
    runtime: str
    device: str
    variant: ModelVariant
    reason: str

    def label(self) -> str:
        return f"{self.runtime}:{self.device} {self.variant.format}/{self.variant.precision}"


@dataclass(frozen=True)
class Ranking:
    candidates: list[Candidate]
    excluded: list[tuple[str, str]]  # (what, why): runtimes or variants left out, for the operator


def _tiers(profile: HardwareProfile) -> list[Tier]:
    """Every registered runtime's tiers for this hardware, in the order of the shared scale."""
    tiers = [tier for cls in runtime_classes().values() for tier in cls.tiers(profile)]
    return sorted(tiers, key=lambda t: t.order)


def rank(
    profile: HardwareProfile,
    probes: Mapping[str, ProbeResult],
    variants: Iterable[ModelVariant],
    force_runtime: str | None = None,
    force_device: str | None = None,
) -> Ranking:
    """Order every workable (runtime, device, variant) for this device, best first, each with its reason."""
    variants = list(variants)
    if force_runtime:
        return _forced(probes, variants, force_runtime.lower(), force_device)
    excluded: list[tuple[str, str]] = []
    seen: set[tuple[str, str, Path]] = set()
    out: list[Candidate] = []
    for tier in _tiers(profile):
        for v in _tier_variants(tier, probes.get(tier.runtime), variants, excluded):
            if (tier.runtime, tier.device, v.path) not in seen:
                seen.add((tier.runtime, tier.device, v.path))
                out.append(Candidate(tier.runtime, tier.device, v, f"{tier.reason}; {v.precision}"))
    for v in variants:
        if EDGETPU in v.hints and not profile.has_coral:
            excluded.append((v.path.name, "compiled for the Edge TPU, and no Coral is attached"))
    return Ranking(out, excluded)


def _tier_variants(
    tier: Tier, probe: ProbeResult | None, variants: list[ModelVariant], excluded: list[tuple[str, str]]
) -> list[ModelVariant]:
    """The variants ``tier`` can run, best first; what it cannot offer goes to ``excluded`` with the reason."""
    where = f"{tier.runtime}:{tier.device}"
    if probe is None or not probe.available:
        excluded.append((where, probe.reason if probe else "runtime unknown"))
        return []
    if tier.device != "CPU" and not probe.has_device(tier.device):
        excluded.append(
            (where, f"{tier.runtime} {probe.version} does not offer {tier.device} here (has {', '.join(probe.devices) or 'none'})")
        )
        return []
    fits = [v for v in variants if v.format in tier.formats and ((tier.hint in v.hints) if tier.hint else EDGETPU not in v.hints)]
    if tier.static_only:
        for v in fits:
            if v.static_shapes is not True:
                excluded.append((f"{where} {v.path.name}", "shapes dynamic or unknown; the NPU needs static shapes"))
        fits = [v for v in fits if v.static_shapes is True]
    return sorted(fits, key=lambda v: (tier.formats.index(v.format), _precision_index(tier.precisions, v.precision)))


def preferred_variants(profile: HardwareProfile, probes: Mapping[str, ProbeResult]) -> list[str]:
    """The bundle variant ids this device would run, best first — what it tells the controller in ``reported``.

    Why the device says it: only it knows its hardware and installed runtimes; the controller then
    assigns the best variant a release has for it. The ids ranked are those the registry's runtimes prefer.
    """
    ids = dict.fromkeys(vid for cls in runtime_classes().values() for vid in cls.variants)
    fake = [
        ModelVariant.model_validate({"path": f"{v}.model", "format": v.split("-")[0], "precision": v.split("-")[1], "static_shapes": True})
        for v in ids
    ]
    ranking = rank(profile, probes, fake)
    return list(dict.fromkeys(cand.variant.path.stem for cand in ranking.candidates))


def _precision_index(order: tuple[Precision, ...], precision: str) -> int:
    return order.index(precision) if precision in order else len(order)  # type: ignore[arg-type]


def _forced(probes: Mapping[str, ProbeResult], variants: list[ModelVariant], runtime: str, device: str | None) -> Ranking:
    cls = get_runtime(runtime)
    probe = probes.get(runtime)
    excluded = [] if probe is None or probe.available else [(runtime, probe.reason)]
    dev = (device or cls.default_device).upper()
    chosen = [Candidate(runtime, dev, v, "forced by settings") for v in variants if v.format in cls.formats]
    if not chosen:
        excluded.append((runtime, _reads_other_formats(cls, variants)))
    return Ranking(chosen, excluded)


_FORMAT_LABELS = {"onnx": ".onnx", "tflite": ".tflite", "openvino": "OpenVINO IR (.xml)"}


def _reads_other_formats(cls: type[Runtime], variants: list[ModelVariant]) -> str:
    """Why a forced runtime has nothing to run, and which runtimes would: "onnx reads .onnx; this model is .tflite; runtimes
    that read .tflite: litert, openvino"."""
    label = _FORMAT_LABELS.get
    have = sorted({v.format for v in variants})
    why = f"{cls.name} reads {', '.join(label(f, f) for f in sorted(cls.formats))}"
    why += f"; this model is {', '.join(label(f, f) for f in have) or 'nothing'}"
    for fmt in have:
        readers = sorted(n for n, c in runtime_classes().items() if fmt in c.formats)
        why += f"; runtimes that read {label(fmt, fmt)}: {', '.join(readers) or 'none'}"
    return why


# ------------------------------------------------------------------- validation


@dataclass
class Selection:
    runtime: Runtime
    candidate: Candidate
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (candidate label, why it was passed over)
    warmup_seconds: float = 0.0


def select(
    candidates: Iterable[Candidate],
    golden: Iterable[GoldenSample] = (),
    options: Mapping[str, Mapping[str, Any]] | None = None,
    latency_budget_s: float | None = None,
    profile: HardwareProfile | None = None,
    hints: InputHints | None = None,
    request: Mapping[str, Any] | np.ndarray | None = None,
) -> Selection:
    """Load, check the caller's ``request``, warm up and check golden samples on each candidate in order; the first that
    passes is returned.

    ``profile`` is handed to each runtime's ``load``: runtimes read the hardware from it, never detect it again.
    ``hints`` (default: the golden samples' inputs) give each load the inputs it will see and the batch axes; a
    ``request`` the loaded model refuses raises that ``InvalidInput`` at once: the input is wrong, not the runtime.
    """
    attempts: list[tuple[str, str]] = []
    golden = list(golden)
    hints = hints or InputHints(samples=tuple(g.inputs for g in golden))
    for cand in candidates:
        rt: Runtime | None = None
        try:
            rt = get_runtime(cand.runtime)()
            rt.load(cand.variant.path, cand.device, (options or {}).get(cand.runtime), profile, hints)
            warm = _validate(rt, golden, request, latency_budget_s)
        except InvalidInput:
            _close(rt, cand)
            raise
        except EdgefleetError as exc:
            _give_up(rt, cand, exc, attempts)
            continue
        except Exception as exc:  # a backend bug must cost one candidate, not the agent
            _give_up(rt, cand, exc, attempts)
            continue
        logs.event(log, "selection.chosen", candidate=cand.label(), reason=cand.reason, passed_over=len(attempts))
        return Selection(rt, cand, attempts, warm)
    raise NoUsableRuntime(_nothing_works(attempts), attempts)


def _validate(rt: Runtime, golden: list[GoldenSample], request: Mapping[str, Any] | np.ndarray | None, budget_s: float | None) -> float:
    """The loaded candidate's checks, in order: the caller's inputs, the warm-up, the golden samples, the latency budget."""
    if request is not None:
        rt.check(request)
    warm = rt.warmup()
    for sample in golden:
        sample.check(rt.infer(sample.inputs))
    if budget_s is not None and warm > budget_s:
        raise HealthCheckFailed(f"warm latency {warm * 1e3:.2f} ms exceeds the budget {budget_s * 1e3:.2f} ms")
    return warm


def _nothing_works(attempts: list[tuple[str, str]]) -> str:
    return "no runtime could run this model: " + ("; ".join(f"{c}: {why}" for c, why in attempts) or "no candidates")


def _give_up(rt: Runtime | None, cand: Candidate, exc: BaseException, attempts: list[tuple[str, str]]) -> None:
    why = f"{type(exc).__name__}: {exc}"
    attempts.append((cand.label(), why))
    logs.event(log, "selection.fallback", logging.WARNING, candidate=cand.label(), reason=why)
    _close(rt, cand)


def _close(rt: Runtime | None, cand: Candidate) -> None:
    if rt is not None:
        try:
            rt.close()
        except Exception as close_exc:  # closing a half-loaded backend may fail too; the fallback goes on
            logs.event(log, "selection.close_failed", logging.WARNING, candidate=cand.label(), reason=str(close_exc))


def choose(
    profile: HardwareProfile,
    probes: Mapping[str, ProbeResult],
    variants: Iterable[ModelVariant],
    golden: Iterable[GoldenSample] = (),
    force_runtime: str | None = None,
    force_device: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    latency_budget_s: float | None = None,
    hints: InputHints | None = None,
    request: Mapping[str, Any] | np.ndarray | None = None,
) -> tuple[Selection, Ranking]:
    """Rank and validate in one call: what the agent does when it activates a model (``select`` says what ``hints`` and
    ``request`` do)."""
    ranking = rank(profile, probes, variants, force_runtime, force_device)
    t0 = time.perf_counter()
    try:
        sel = select(ranking.candidates, golden, options, latency_budget_s, profile, hints, request)
    except NoUsableRuntime as exc:
        attempts = ranking.excluded + exc.attempts
        raise NoUsableRuntime(_nothing_works(attempts), attempts) from None
    logs.event(log, "selection.done", seconds=f"{time.perf_counter() - t0:.3f}")
    return sel, ranking
