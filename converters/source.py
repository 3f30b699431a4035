"""The model the user hands us: its format, hash, signature, and the reference answers.

The reference answers come from the source's own runtime with graph
optimizations off (ONNX Runtime for ONNX, LiteRT for TFLite): every variant is
judged against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundle import TensorSignature
from agent.errors import EdgefleetError
from agent.files import sha256_file
from agent.runtimes import get_runtime
from agent.runtimes.base import Runtime, TensorSpec
from converters.errors import MissingExtra, SourceError
from converters.samples import batches

SOURCE_FORMATS = {".onnx": "onnx", ".tflite": "tflite", ".keras": "keras", ".h5": "keras"}


def signature(spec: TensorSpec) -> TensorSignature:
    return TensorSignature(name=spec.name, shape=list(spec.shape), dtype=spec.dtype.name, quantization=spec.quantization)


@dataclass
class Source:
    format: str  # onnx | tflite
    path: Path
    sha256: str
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]

    @property
    def static_shapes(self) -> bool:
        return all(d >= 0 for t in self.inputs for d in t.shape)

    @property
    def batch_dynamic(self) -> bool:
        return all(t.shape and t.shape[0] < 0 for t in self.inputs)

    def _runtime(self) -> Runtime:
        if self.format == "onnx":
            rt = get_runtime("onnx")()
            rt.load(self.path, "CPU", {"graph_optimization": "disable"})
        else:
            rt = get_runtime("litert")()
            rt.load(self.path, "CPU")
        return rt

    def reference(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The source model's own answers for the samples (stacked on dim 0)."""
        try:
            with self._runtime() as rt:
                size = next(iter(data.values())).shape[0] if self.batch_dynamic else 1
                parts = [rt.infer(b) for b in batches(data, size)]
        except EdgefleetError as exc:
            raise SourceError(f"the source model fails on the samples: {exc}") from exc
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def open_source(path: Path) -> Source:
    """Identify and load the source; a corrupt or unsupported file is a ``SourceError``."""
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            raise MissingExtra("TensorFlow SavedModel sources are not supported by this build yet (see the README)")
        raise SourceError(f"{path} is a directory without a saved_model.pb")
    if not path.is_file():
        raise SourceError(f"source model not found: {path}")
    fmt = SOURCE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(f"{path.name}: unsupported source (expected .onnx, .tflite, .keras, .h5 or a SavedModel directory)")
    if fmt == "keras":
        raise MissingExtra("Keras sources are not supported by this build yet (see the README)")
    src = Source(fmt, path, sha256_file(path), [], [])
    try:
        with src._runtime() as rt:
            src.inputs = [signature(s) for s in rt.inputs]
            src.outputs = [signature(s) for s in rt.outputs]
    except EdgefleetError as exc:
        raise SourceError(f"cannot load {path.name}: {exc}") from exc
    return src
