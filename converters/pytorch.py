"""PyTorch sources: an ``nn.Module`` is exported to ONNX (``torch.onnx``), then built like any ONNX model.

Python API only — a module is an object, not a file. The batch dimension is
exported as dynamic so every variant accepts batch > 1.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.build import BuildReport, build
from converters.errors import MissingExtra, SourceError

__all__ = ["build_pytorch", "export_onnx"]


def export_onnx(
    module: Any,
    example_inputs: Sequence[Any],
    path: Path,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = 17,
) -> Path:
    """Export ``module`` to ONNX at ``path`` with a dynamic batch dimension on every input and output."""
    try:
        import torch
    except ImportError:
        raise MissingExtra("PyTorch sources need torch: pip install 'edgefleet[pytorch]'") from None
    inputs = tuple(example_inputs)
    in_names = list(input_names or [f"input_{i}" for i in range(len(inputs))])
    module.eval()
    with torch.no_grad():
        probe = module(*inputs)
    n_out = len(probe) if isinstance(probe, (tuple, list)) else 1
    out_names = list(output_names or [f"output_{i}" for i in range(n_out)])
    if len(in_names) != len(inputs) or len(out_names) != n_out:
        raise SourceError(f"the module takes {len(inputs)} inputs and returns {n_out} outputs; names given: {in_names} -> {out_names}")
    dynamic = {name: {0: "batch"} for name in [*in_names, *out_names]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter still does what we need
            torch.onnx.export(
                module,
                inputs,
                str(path),
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=False,
            )
    except Exception as exc:  # torch raises many types here (unsupported ops, tracing errors)
        raise SourceError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    return path


def build_pytorch(
    module: Any,
    example_inputs: Sequence[Any],
    name: str,
    version: str,
    out: str | Path,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    **options: Any,
) -> BuildReport:
    """``converters.build`` for an ``nn.Module``; ``options`` are ``build``'s (samples, variants, tolerances, ...)."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-torch-") as d:
        onnx_path = export_onnx(module, example_inputs, Path(d) / "model.onnx", input_names, output_names)
        return build(onnx_path, name, version, out, source_format="pytorch", **options)
