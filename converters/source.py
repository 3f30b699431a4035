"""The model the user hands us: its format, hash, signature, and the reference answers.

The reference answers come from the source's own runtime with graph
optimizations off (ONNX Runtime for ONNX, LiteRT for TFLite): every variant is
judged against them. The source also learns each output's batch axis from that
run, since the signature alone cannot say which dimension of ``stateN`` stacks samples.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundle import TensorSignature
from agent.errors import EdgefleetError
from agent.files import sha256_file
from agent.runtimes import runtime_for_format
from agent.runtimes.base import Runtime
from agent.runtimes.tensors import TensorSpec
from converters import samples as sample_io
from converters.errors import MissingExtra, SourceError

SOURCE_FORMATS = {".onnx": "onnx", ".tflite": "tflite", ".keras": "keras", ".h5": "keras"}


def signature(spec: TensorSpec) -> TensorSignature:
    return TensorSignature(name=spec.name, shape=list(spec.shape), dtype=spec.dtype.name, quantization=spec.quantization)


def tensorflow_child(*args: str, timeout: float = 1800) -> None:
    """Run ``converters._tensorflow_child``; a missing TensorFlow is a ``MissingExtra``."""
    done = subprocess.run([sys.executable, "-m", "converters._tensorflow_child", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        if "No module named 'tensorflow'" in done.stderr or "No module named 'keras'" in done.stderr:
            raise MissingExtra("Keras and SavedModel sources need TensorFlow: pip install 'edgefleet[convert]'")
        raise SourceError(f"TensorFlow {args[0]} failed: {tail[0]}")


@dataclass
class Source:
    format: str  # onnx | tflite | keras | savedmodel
    path: Path  # the file to convert from: for keras and savedmodel, a SavedModel directory
    sha256: str
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]
    workdir: Path | None = None  # scratch space owned by this source (an exported SavedModel)
    origin: str | None = None  # what the user handed us when it is not ``format`` (a PyTorch module exported to ONNX)

    def close(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def scratch(self) -> Path:
        """A directory owned by this source for conversions several variants share (removed by ``close``)."""
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="edgefleet-src-"))
        return self.workdir

    @property
    def is_tensorflow(self) -> bool:
        return self.format in ("keras", "savedmodel")

    @property
    def static_shapes(self) -> bool:
        return all(d >= 0 for t in self.inputs for d in t.shape)

    @property
    def batch_dynamic(self) -> bool:
        """Every input with a batch axis leaves it dynamic: all samples can go in one run."""
        batched = [t for t in self.inputs if t.batch_axis is not None]
        return bool(batched) and all(t.shape[t.batch_axis] < 0 for t in batched)  # type: ignore[index]

    @property
    def is_quantized(self) -> bool:
        """An int8 TFLite source: its int8 variant is a copy, no calibration involved."""
        return any(t.quantization for t in self.inputs)

    def _runtime(self) -> Runtime:
        rt = runtime_for_format(self.format)()
        # ONNX Runtime's graph optimizations off, as the module docstring says; LiteRT has no such switch.
        rt.load(self.path, "CPU", {"graph_optimization": "disable"} if rt.name == "onnx" else None)
        return rt

    def reference(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The source model's own answers for the samples (stacked on each input's batch axis); sets the outputs' axes."""
        n = sample_io.count(data, self.inputs)
        if self.is_tensorflow:
            with tempfile.TemporaryDirectory() as d:
                np.savez(Path(d) / "in.npz", **data)  # type: ignore[arg-type]
                tensorflow_child("reference", str(self.path), str(Path(d) / "in.npz"), str(Path(d) / "out.npz"))
                with np.load(Path(d) / "out.npz", allow_pickle=False) as z:
                    answers = {k: z[k] for k in z.files}
            self.outputs = sample_io.output_axes(self.outputs, answers, self.inputs, n)
            return answers
        size = n if self.batch_dynamic else 1
        try:
            with self._runtime() as rt:
                parts = [rt.infer(b) for b in sample_io.batches(data, self.inputs, size)]
        except EdgefleetError as exc:
            raise SourceError(f"the source model fails on the samples: {exc}") from exc
        self.outputs = sample_io.output_axes(self.outputs, parts[0], self.inputs, size)
        return sample_io.concat(parts, self.outputs)


def open_source(path: Path) -> Source:
    """Identify and load the source; a corrupt or unsupported file is a ``SourceError``."""
    path = Path(path)
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise SourceError(f"{path} is a directory without a saved_model.pb")
        return _open_tensorflow(path, "savedmodel", _sha256_dir(path))
    if not path.is_file():
        raise SourceError(f"source model not found: {path}")
    fmt = SOURCE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(f"{path.name}: unsupported source (expected .onnx, .tflite, .keras, .h5 or a SavedModel directory)")
    if fmt == "keras":
        return _open_tensorflow(path, "keras", sha256_file(path))
    src = Source(fmt, path, sha256_file(path), [], [])
    try:
        with src._runtime() as rt:
            src.inputs = [signature(s) for s in rt.inputs]
            src.outputs = [signature(s) for s in rt.outputs]
    except EdgefleetError as exc:
        raise SourceError(f"cannot load {path.name}: {exc}") from exc
    return src


def _open_tensorflow(path: Path, fmt: str, digest: str) -> Source:
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-tf-"))
    try:
        tensorflow_child("prepare", str(path), str(workdir))
        sig = json.loads((workdir / "signature.json").read_text())
        return Source(
            fmt,
            Path(sig["saved_model"]),
            digest,
            [TensorSignature(**t) for t in sig["inputs"]],
            [TensorSignature(**t) for t in sig["outputs"]],
            workdir,
        )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _sha256_dir(root: Path) -> str:
    """One hash over a SavedModel directory: relative paths and contents, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()
