"""The model bundle: one model, several verified variants, and golden samples — ``bundle.json``.

Why here, in the agent: the device reads the same file the converters write, so
the one pydantic model both validate against lives with the smaller install.
Unknown fields are refused: a bundle from a newer, incompatible writer fails
loudly instead of being half understood.
"""

from __future__ import annotations

import math
import re
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import EdgefleetError
from agent.files import sha256_file
from agent.runtimes.formats import ModelFormat, Precision
from agent.runtimes.golden import GoldenSample
from agent.selection import ModelVariant

__all__ = [
    "BUNDLE_FILE",
    "SCHEMA_VERSION",
    "Bundle",
    "BundleError",
    "GoldenSamplesTooLarge",
    "MAX_GOLDEN_BYTES",
    "NotBuilt",
    "OutputParity",
    "Parity",
    "TensorSignature",
    "Variant",
    "load_bundle",
    "verify_files",
    "verify_variant",
]

BUNDLE_FILE = "bundle.json"
SCHEMA_VERSION: Literal[2] = 2  # 2: batch axes, per-output parity, why each variant was not built (1 still reads)
MAX_BUNDLE_JSON_BYTES = 4 * 1024 * 1024
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BundleError(EdgefleetError):
    """A bundle that is missing, malformed, or whose files do not match their record."""

    code = "bad_bundle"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _safe_relative(value: str) -> str:
    """Bundle paths are plain file names inside the bundle: no directories, no '..', no absolute paths."""
    if not _SAFE_NAME.match(value):
        raise ValueError(f"{value!r} is not a plain file name")
    return value


class TensorSignature(_Strict):
    """One input or output of the model. ``batch_axis``: the dimension along which samples (and the agent's micro-batched
    requests) stack — 0 for most models, 1 for a recurrent state ``[layers, batch, hidden]``, None for an input that has
    no batch dimension (a 0-d scalar such as a sample rate, or a fixed table)."""

    name: str
    shape: list[int]  # -1 for a dynamic dimension; [] for a 0-d scalar
    dtype: str
    quantization: tuple[float, int] | None = None
    batch_axis: int | None = 0

    @model_validator(mode="before")
    @classmethod
    def _scalars_have_no_batch_axis(cls, data: object) -> object:
        """A 0-d tensor that does not name its batch axis has none (the default 0 cannot apply to it)."""
        if isinstance(data, dict) and data.get("shape") == [] and "batch_axis" not in data:
            return {**data, "batch_axis": None}
        return data

    @model_validator(mode="after")
    def _axis_in_shape(self) -> TensorSignature:
        if self.batch_axis is not None and not 0 <= self.batch_axis < len(self.shape):
            raise ValueError(f"{self.name}: batch axis {self.batch_axis} outside shape {self.shape}")
        return self

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        try:
            np.dtype(v)
        except TypeError:
            raise ValueError(f"unknown dtype {v!r}") from None
        return v

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d < -1 for d in v) or len(v) > 8:
            raise ValueError(f"bad shape {v}")
        return v


class OutputParity(_Strict):
    """One output's agreement with the source model. ``atol`` is the effective tolerance (the configured one scaled to the
    output's range), the number a parity failure must be read against. ``kind``: "class_scores" (a last axis of logits or
    probabilities: top-1 agreement applies) or "values" (regressions, boxes, masks, states: only the absolute error)."""

    kind: Literal["class_scores", "values"]
    max_abs_error: float
    mean_abs_error: float
    atol: float
    top1_agreement: float | None = None
    passed: bool


class Parity(_Strict):
    """How a variant's answers compare to the source model's on the samples; per output in ``outputs``."""

    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float | None = None  # when outputs look like class scores
    samples: int
    atol: float
    min_top1: float | None = None
    passed: bool
    outputs: dict[str, OutputParity] = {}


class NotBuilt(_Strict):
    """A variant the build did not keep, and why: ``skipped`` (its converter or toolchain cannot make it, or int8 without
    real calibration samples), ``dropped`` (made, but outside parity; ``--drop-failing``) or ``failed`` (its converter
    broke). ``parity`` holds the numbers for a dropped variant; ``layers`` the layers the error was traced to, if any."""

    state: Literal["skipped", "dropped", "failed"]
    reason: str
    parity: Parity | None = None
    layers: list[str] = []


class Variant(_Strict):
    id: str  # e.g. "onnx-int8"
    format: ModelFormat
    precision: Precision
    file: str
    extra_files: list[str] = []  # e.g. OpenVINO's .bin beside the .xml
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    parity: Parity
    min_runtime_version: dict[str, str] = {}  # runtime name -> version the variant was verified with
    hints: list[str] = []  # "edgetpu", ...
    static_shapes: bool
    golden: str  # .npz with in:<name> and out:<name> arrays
    input_shapes: dict[str, list[int]] = {}  # shapes the converter fixed (e.g. OpenVINO from a dynamic-rank ONNX)
    float_layers: list[str] = []  # layers kept in float so that the int8 variant passes parity

    @field_validator("file", "golden")
    @classmethod
    def _plain_names(cls, v: str) -> str:
        return _safe_relative(v)

    @field_validator("extra_files")
    @classmethod
    def _extras(cls, v: list[str]) -> list[str]:
        return [_safe_relative(x) for x in v]


class Bundle(_Strict):
    schema_version: Literal[1, 2] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}$")
    created: datetime
    source_format: Literal["onnx", "tflite", "keras", "savedmodel", "pytorch"]
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]
    variants: list[Variant]
    synthetic_samples: bool  # True: parity was checked on generated inputs, not the user's data
    skipped: dict[str, NotBuilt] = {}  # variant id -> why it is not in ``variants``

    @field_validator("skipped", mode="before")
    @classmethod
    def _older_skipped(cls, v: object) -> object:
        """Schema 1 wrote ``{variant: reason}``: read it as skipped with that reason."""
        if isinstance(v, dict):
            return {k: {"state": "skipped", "reason": r} if isinstance(r, str) else r for k, r in v.items()}
        return v

    def model_variants(self, root: Path) -> list[ModelVariant]:
        """The variants as selection ranks them, with paths under ``root``."""
        return [
            ModelVariant(
                path=root / v.file, format=v.format, precision=v.precision, hints=frozenset(v.hints), static_shapes=v.static_shapes
            )
            for v in self.variants
        ]

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise BundleError(f"{self.name} {self.version} has no variant {variant_id!r}")

    def variant_for(self, path: Path) -> Variant:
        for v in self.variants:
            if v.file == path.name:
                return v
        raise BundleError(f"{path.name} is not a variant of {self.name} {self.version}")

    def golden_samples(self, root: Path, variant: Variant) -> list[GoldenSample]:
        """The variant's golden pairs, with its own verified tolerance (never tighter than measured)."""
        path = root / variant.golden
        try:
            _check_golden_size(path, variant.golden)  # before np.load inflates anything
            with np.load(path, allow_pickle=False) as z:
                ins = {k[3:]: z[k] for k in z.files if k.startswith("in:")}
                outs = {k[4:]: z[k] for k in z.files if k.startswith("out:")}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise BundleError(f"golden samples {variant.golden}: {exc}") from exc
        if set(ins) != {t.name for t in self.inputs} or not outs:
            raise BundleError(f"golden samples {variant.golden} do not match the bundle's signature")
        atol = max(variant.parity.atol, variant.parity.max_abs_error * 1.5)
        return [GoldenSample(ins, outs, atol=atol, rtol=0.0)]


class GoldenSamplesTooLarge(BundleError):
    """Golden samples that would inflate past ``MAX_GOLDEN_BYTES`` when loaded: an .npz zip bomb."""


# Golden samples are 4 input/output pairs, all loaded into memory at once on a device that may have 1 GiB. An
# absolute cap rather than a multiple of the file size: real samples (zero padding, ReLU outputs) can compress
# 100x or more, while 4 pairs of even a 3x1024x1024 float32 image are 48 MiB. A ~2 MB .npz of zeros can claim 2 GB.
MAX_GOLDEN_BYTES = 256 * 1024 * 1024


def _check_golden_size(path: Path, label: str, limit: int = MAX_GOLDEN_BYTES) -> None:
    """Refuse an .npz whose arrays would take more than ``limit`` bytes, reading only zip and .npy headers.

    Two sizes are checked because each alone can be fooled: the zip's declared
    uncompressed sizes (zipfile inflates a member no further than that, then checks its
    CRC) summed against ``limit``, and each .npy header's shape x itemsize against its
    member's declared size (``np.load`` allocates what the header claims before reading).
    """
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        total = sum(i.file_size for i in infos)
        if total > limit:
            raise GoldenSamplesTooLarge(f"golden samples {label}: {total} bytes uncompressed; the limit is {limit}")
        for info in infos:
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise BundleError(f"golden samples {label}: {info.filename} is .npy format {version}, not 1.0 or 2.0")
            claimed = math.prod(shape) * dtype.itemsize
            if claimed > info.file_size:
                raise GoldenSamplesTooLarge(f"golden samples {label}: {info.filename} claims {claimed} bytes in {info.file_size}")


def verify_files(bundle: Bundle, root: Path) -> None:
    """Every variant file is present with its recorded size and sha256 (extra files present)."""
    for v in bundle.variants:
        verify_variant(v, root)


def verify_variant(v: Variant, root: Path) -> None:
    """One variant's files, as a device that installed only this variant holds them."""
    path = root / v.file
    try:
        size = path.stat().st_size
        if size != v.size:
            raise BundleError(f"{v.file}: {size} bytes, the bundle says {v.size}")
        digest = sha256_file(path)
    except OSError as exc:
        raise BundleError(f"{v.file}: {exc.strerror or exc}") from exc
    if digest != v.sha256:
        raise BundleError(f"{v.file}: sha256 does not match the bundle")
    for extra in [*v.extra_files, v.golden]:
        if not (root / extra).is_file():
            raise BundleError(f"{extra} is missing from the bundle")


def load_bundle(root: str | Path) -> Bundle:
    """Read and validate ``root/bundle.json``; every failure is a ``BundleError`` naming the problem."""
    path = Path(root) / BUNDLE_FILE
    try:
        size = path.stat().st_size
        if size > MAX_BUNDLE_JSON_BYTES:
            raise BundleError(f"{path} is {size} bytes; the limit is {MAX_BUNDLE_JSON_BYTES}")
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return Bundle.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise BundleError(f"{path} is not a valid bundle: {problems}") from exc
