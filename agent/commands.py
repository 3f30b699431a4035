"""The agent's commands as Python functions; ``agent.cli`` is a thin layer over these.

Why: tests, the daemon and other programs call the same code the operator runs,
with typed results instead of printed text.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InvalidInput, MissingInput, ModelLoadError
from agent.hardware import HardwareProfile, detect
from agent.runtimes import probe_all
from agent.runtimes.base import MODEL_FORMATS, ModelDescription, ProbeResult
from agent.selection import ModelVariant, Ranking, choose, rank
from agent.settings import AgentSettings, load_settings

__all__ = ["HardwareReport", "InferResult", "hardware", "infer", "load_inputs"]

MAX_INPUT_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class HardwareReport:
    profile: HardwareProfile
    probes: dict[str, ProbeResult]
    ranking: Ranking

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile.model_dump(mode="json"),
            "runtimes": {
                n: {"available": p.available, "version": p.version, "devices": list(p.devices), "reason": p.reason}
                for n, p in self.probes.items()
            },
            "ranking": [
                {"runtime": c.runtime, "device": c.device, "format": c.variant.format, "reason": c.reason} for c in self.ranking.candidates
            ],
            "excluded": [{"what": w, "why": y} for w, y in self.ranking.excluded],
        }


def hardware(root: str | Path = "/") -> HardwareReport:
    """The hardware profile and the runtimes ranked for it, each with its reason.

    With no model in hand the ranking is for one fp32, static-shape variant of each
    format, i.e. what this device would prefer given the choice.
    """
    profile = detect(root)
    probes = probe_all()
    placeholders = [ModelVariant(path=Path(f"model.{fmt}"), format=fmt, static_shapes=True) for fmt in MODEL_FORMATS]  # type: ignore[arg-type]
    return HardwareReport(profile, probes, rank(profile, probes, placeholders))


@dataclass
class InferResult:
    outputs: dict[str, np.ndarray]
    latency_s: list[float]
    description: ModelDescription
    passed_over: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        lat = sorted(self.latency_s)
        return {
            "outputs": {k: v.tolist() for k, v in self.outputs.items()},
            "latency_ms": {"first": self.latency_s[0] * 1e3, "median": lat[len(lat) // 2] * 1e3, "runs": len(lat)},
            "model": self.description.to_json(),
            "passed_over": [{"candidate": c, "why": w} for c, w in self.passed_over],
        }


def load_inputs(path: str | Path) -> dict[str, np.ndarray] | np.ndarray:
    """Read request tensors from ``.npy`` (one array), ``.npz`` (named) or ``.json`` (object of name -> nested list, or one list)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidInput(f"cannot read input file {path}: {exc.strerror or exc}") from exc
    if size > MAX_INPUT_FILE_BYTES:
        raise InvalidInput(f"input file {path.name} is {size} bytes; the limit is {MAX_INPUT_FILE_BYTES}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)  # type: ignore[no-any-return]
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return {str(k): np.asarray(v) for k, v in data.items()}
            return np.asarray(data)
    except (ValueError, OSError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"cannot parse {path.name}: {exc}") from exc
    raise InvalidInput(f"input file must be .npy, .npz or .json, not {path.name}")


def infer(
    model: str | Path,
    inputs: dict[str, Any] | np.ndarray | str | Path,
    runtime: str | None = None,
    device: str | None = None,
    precision: str = "fp32",
    root: str | Path | None = None,
    repeat: int = 1,
    options: dict[str, dict[str, Any]] | None = None,
    settings: AgentSettings | None = None,
) -> InferResult:
    """Run one request locally on the runtime that selection picks (or the one forced).

    Arguments win over ``settings`` (default: the agent's settings file and environment).
    """
    settings = settings or load_settings()
    rs = settings.runtime
    runtime = runtime or rs.force_runtime
    device = device or (rs.force_device if runtime == rs.force_runtime else None)
    options = {**rs.options, **(options or {})}
    root = settings.hardware_root if root is None else root
    budget = rs.latency_budget_ms / 1e3 if rs.latency_budget_ms is not None else None
    model = Path(model)
    if not model.is_file():
        raise ModelLoadError(f"model file not found: {model}")
    if isinstance(inputs, (str, Path)):
        inputs = load_inputs(inputs)
    variant = ModelVariant.from_path(model, precision=precision)  # type: ignore[arg-type]
    sel, _ = choose(
        detect(root), probe_all(), [variant], force_runtime=runtime, force_device=device, options=options, latency_budget_s=budget
    )
    rt = sel.runtime
    try:
        if isinstance(inputs, np.ndarray):
            if len(rt.inputs) != 1:
                raise MissingInput(f"the model has inputs {[s.name for s in rt.inputs]}: give them by name (.npz or a JSON object)")
            inputs = {rt.inputs[0].name: inputs}
        latencies = []
        outputs: dict[str, np.ndarray] = {}
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            outputs = rt.infer(inputs)
            latencies.append(time.perf_counter() - t0)
        return InferResult(outputs, latencies, rt.describe(), sel.attempts)
    finally:
        rt.close()
