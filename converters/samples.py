"""Sample inputs for calibration and parity: the user's, or deterministic synthetic ones."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from agent.bundle import TensorSignature
from converters.errors import SamplesError

SYNTHETIC_COUNT = 32
MAX_SAMPLES_BYTES = 1 << 30


def synthetic(inputs: list[TensorSignature], count: int = SYNTHETIC_COUNT, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs from the signature: floats uniform in [-1, 1], integers in [0, 10)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in inputs:
        if any(d < 0 for d in t.shape[1:]):
            raise SamplesError(f"input {t.name!r} has dynamic dims {t.shape}: synthetic samples need --samples with real data")
        shape = (count, *t.shape[1:])
        dtype = np.dtype(t.dtype)
        if t.quantization is not None:  # a quantized model takes floats (the runtime quantizes)
            dtype = np.dtype(np.float32)
        if dtype.kind == "f":
            out[t.name] = rng.uniform(-1.0, 1.0, shape).astype(dtype)
        elif dtype.kind == "b":
            out[t.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            out[t.name] = rng.integers(0, 10, shape).astype(dtype)
    return out


def load(path: Path, inputs: list[TensorSignature]) -> dict[str, np.ndarray]:
    """Samples stacked along the first (batch) dimension: ``.npy`` for a one-input model, ``.npz`` named per input."""
    try:
        if path.stat().st_size > MAX_SAMPLES_BYTES:
            raise SamplesError(f"{path.name} is larger than {MAX_SAMPLES_BYTES} bytes")
        if path.suffix == ".npy":
            if len(inputs) != 1:
                raise SamplesError(f"the model has inputs {[t.name for t in inputs]}: give samples as .npz named per input")
            data = {inputs[0].name: np.load(path, allow_pickle=False)}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        else:
            raise SamplesError(f"samples must be .npy or .npz, not {path.name}")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SamplesError(f"cannot read samples {path.name}: {exc}") from exc
    names = [t.name for t in inputs]
    if sorted(data) != sorted(names):
        raise SamplesError(f"samples name {sorted(data)}, the model's inputs are {names}")
    counts = set()
    for t in inputs:
        arr = data[t.name]
        if arr.dtype.kind not in "biuf":
            raise SamplesError(f"samples for {t.name!r} are {arr.dtype}, not numbers")
        if arr.ndim != len(t.shape) or any(d >= 0 and d != a for d, a in zip(t.shape[1:], arr.shape[1:])):
            raise SamplesError(f"samples for {t.name!r} have shape {list(arr.shape)}; the input is {t.shape} (samples stacked on dim 0)")
        if arr.shape[0] == 0:
            raise SamplesError(f"samples for {t.name!r} are empty")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise SamplesError(f"samples for {t.name!r} contain NaN or infinity")
        counts.add(arr.shape[0])
        want = np.dtype(np.float32) if t.quantization else np.dtype(t.dtype)
        data[t.name] = arr.astype(want) if arr.dtype != want else arr
    if len(counts) != 1:
        raise SamplesError(f"inputs have different sample counts: {sorted(counts)}")
    return data


def batches(data: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = next(iter(data.values())).shape[0]
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, n, size)]
