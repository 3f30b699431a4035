"""``build()``: a source model in, a verified multi-runtime bundle out — or nothing at all.

The bundle is assembled in a hidden temp directory beside ``out`` and renamed
into place only when every kept variant passed parity, so an error, a full disk
or a ``kill -9`` never leaves a half bundle where a bundle is expected. Stale
temp directories of dead builds are removed by the next build.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from agent.bundle import BUNDLE_FILE, Bundle, NotBuilt, Parity, Variant
from agent.errors import EdgefleetError
from agent.files import sha256_file
from agent.runtimes import runtime_for_format
from converters import samples as sample_io
from converters.errors import BuildError, SkipVariant
from converters.parity import compare, failure, run_variant, worst_output
from converters.source import Source, open_source
from converters.variants import KINDS, ONNX_WEIGHTED, Job, Produced, VariantKind, feeding_layers

__all__ = ["BuildReport", "NotKept", "VariantReport", "build", "DEFAULT_VARIANTS", "GOLDEN_COUNT"]

DEFAULT_VARIANTS = tuple(KINDS)
GOLDEN_COUNT = 4
Progress = Callable[[str, str, str], None]  # (variant id, state, detail)


@dataclass
class VariantReport:
    id: str
    state: str  # ok | failed | dropped | skipped
    reason: str = ""
    size: int = 0
    latency_ms: float | None = None
    parity: Parity | None = None


@dataclass
class BuildReport:
    out: Path
    bundle: Bundle | None
    synthetic_samples: bool
    variants: list[VariantReport] = field(default_factory=list)
    archive: Path | None = None


def _no_progress(variant: str, state: str, detail: str) -> None:
    pass


LOCK_FILE = ".lock"


def _clean_stale(out: Path) -> None:
    """Remove temp dirs of dead builds: a live build holds an flock on its ``.lock`` (the kernel drops it on kill -9)."""
    for stale in out.parent.glob(f".{out.name}.building-*"):
        lock = stale / LOCK_FILE
        if not lock.exists():
            if time.time() - stale.stat().st_mtime > 60:  # never got its lock: long dead
                shutil.rmtree(stale, ignore_errors=True)
            continue
        try:
            with open(lock, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live build
            continue
        except OSError:
            continue
        shutil.rmtree(stale, ignore_errors=True)


@dataclass(frozen=True)
class _Options:
    """The caller's choices that shape every variant."""

    tolerances: dict[str, float]
    drop_failing: bool
    batch_axes: dict[str, int | None]
    explicit: bool


def build(
    source: str | Path,
    name: str,
    version: str,
    out: str | Path,
    samples: str | Path | None = None,
    variants: Iterable[str] | None = None,
    tolerances: dict[str, float] | None = None,
    drop_failing: bool = False,
    archive: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    source_format: str | None = None,
    batch_axes: dict[str, int | None] | None = None,
) -> BuildReport:
    """Build the bundle ``out`` from ``source``; see the module docstring for the guarantees.

    ``tolerances`` maps a variant id (``onnx-int8``) or a precision (``int8``) to an
    absolute error tolerance (scaled by the output magnitude) that replaces the default.
    ``batch_axes`` maps an input to the dimension its samples stack on (``{"state": 1}``;
    None: no batch dimension); inputs not named get theirs from the samples. int8
    variants are calibrated on ``samples``: without them they are skipped unless named
    in ``variants``.
    """
    out = Path(out)
    progress = progress or _no_progress
    wanted = list(variants or DEFAULT_VARIANTS)
    unknown = [v for v in wanted if v not in KINDS]
    if unknown:
        raise BuildError(f"unknown variant {unknown[0]!r}; known: {', '.join(KINDS)}")
    try:  # the name and version rules live in the Bundle model; check them before any work
        Bundle.model_validate({"name": name, "version": version}, context=None)
    except ValidationError as exc:
        bad = [e for e in exc.errors() if e["loc"][0] in ("name", "version")]
        if bad:
            raise BuildError(f"{bad[0]['loc'][0]} {bad[0].get('input')!r}: {bad[0]['msg']}") from None
    if out.exists() and not force:
        raise BuildError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)

    src = open_source(Path(source))
    if source_format is not None:  # e.g. "pytorch" for a module exported to ONNX on the way in
        src.origin = source_format
    options = _Options(tolerances or {}, drop_failing, dict(batch_axes or {}), variants is not None)
    try:
        return _build(src, name, version, out, samples, wanted, options, archive, progress)
    finally:
        src.close()


@dataclass
class _Run:
    """One build's state while it runs: the source, the samples and their reference answers, the temp dir, the outcome."""

    src: Source
    out: Path
    tmp: Path
    data: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    tolerances: dict[str, float]
    drop_failing: bool
    progress: Progress
    report: BuildReport
    explicit: bool = False  # the caller named the variants (int8 on synthetic samples only when named)
    kept: list[Variant] = field(default_factory=list)
    skipped: dict[str, NotBuilt] = field(default_factory=dict)

    def give_up(self, vid: str, why: NotKept, work: Path) -> None:
        """Record a variant that is not kept (in the report and in ``bundle.json``), tell the caller, drop its work."""
        self.skipped[vid] = NotBuilt(state=why.state, reason=why.reason, parity=why.parity, layers=why.layers)  # type: ignore[arg-type]
        self.report.variants.append(VariantReport(vid, why.state, why.reason, parity=why.parity))
        self.progress(vid, why.state, why.reason)
        shutil.rmtree(work, ignore_errors=True)


def _build(
    src: Source,
    name: str,
    version: str,
    out: Path,
    samples: str | Path | None,
    wanted: list[str],
    options: _Options,
    archive: bool,
    progress: Progress,
) -> BuildReport:
    """Make each wanted variant in a temp dir beside ``out``, then write the manifest and move the whole into place."""
    data, synthetic = _samples(src, samples, options.batch_axes)
    reference = src.reference(data)
    report = BuildReport(out, None, synthetic)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    lock = open(tmp / LOCK_FILE, "wb")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        run = _Run(src, out, tmp, data, reference, options.tolerances, options.drop_failing, progress, report, options.explicit)
        for vid in wanted:
            _make_variant(run, vid)
        _check_outcome(run)
        bundle = _write_manifest(run, name, version, synthetic)
        _move_into_place(tmp, out)
        report.bundle = bundle
        if archive:
            report.archive = _archive(out)
        return report
    except OSError as exc:
        what = "no space left on the output's disk" if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else "I/O error"
        raise BuildError(f"{what} while building {out}: {exc.strerror or exc}", report) from exc
    finally:
        lock.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _samples(src: Source, samples: str | Path | None, batch_axes: dict[str, int | None]) -> tuple[dict[str, np.ndarray], bool]:
    """The user's samples, or synthetic ones when none were given (and whether they are synthetic); sets the inputs' axes."""
    if samples is not None:
        data, src.inputs = sample_io.load(Path(samples), src.inputs, batch_axes)
        return data, False
    src.inputs = sample_io.resolve_axes(src.inputs, None, batch_axes)
    return sample_io.synthetic(src.inputs), True


@dataclass
class NotKept(Exception):
    """Why one variant is not kept: its ``NotBuilt`` state, reason, parity numbers and the layers traced."""

    state: str
    reason: str
    parity: Parity | None = None
    layers: list[str] = field(default_factory=list)


@dataclass
class _Attempt:
    """One conversion of a variant and its parity on its runtime."""

    produced: Produced
    parity: Parity
    latency: float
    version: str


def _make_variant(run: _Run, vid: str) -> None:
    """Produce one variant, check its parity on its runtime (int8: retry with layers in float), keep it when it passes."""
    kind = KINDS[vid]
    work = run.tmp / f".work-{vid}"
    work.mkdir()
    try:
        if kind.precision == "int8" and run.report.synthetic_samples and not run.explicit and not run.src.is_quantized:
            raise NotKept(
                "skipped",
                "int8 is calibrated on samples and only synthetic ones exist: pass --samples with real data "
                f"(or name {vid} in --variants to build it anyway)",
            )
        run.progress(vid, "converting", "")
        attempt = _attempt(run, kind, work / "0")
        if not attempt.parity.passed and kind.keeps_float:
            attempt = _keep_layers_in_float(run, kind, work, attempt)
    except NotKept as why:
        run.give_up(vid, why, work)
        return
    parity, produced = attempt.parity, attempt.produced
    if not parity.passed:
        reason = failure(parity) + (f"; still failing with {len(produced.float_layers)} layers in float" if produced.float_layers else "")
        layers = produced.float_layers or feeding_layers_of(run, kind, worst_output(parity))
        run.give_up(vid, NotKept("dropped" if run.drop_failing else "failed", reason, parity, layers), work)
        return
    size = sum(f.stat().st_size for f in produced.files)
    run.report.variants.append(VariantReport(vid, "ok", "", size, attempt.latency, parity))
    run.progress(vid, "ok", f"{len(produced.float_layers)} layers kept in float" if produced.float_layers else "")
    run.kept.append(_keep(run, kind, produced, parity, {runtime_for_format(kind.format).name: attempt.version}))
    shutil.rmtree(work)


def _attempt(run: _Run, kind: VariantKind, work: Path, float_layers: int = 0, output: str | None = None) -> _Attempt:
    """Produce the variant in ``work`` and check it; ``NotKept`` when its converter cannot make it or it does not run."""
    work.mkdir(parents=True)
    try:
        produced = kind.produce(Job(run.src, work, run.data, float_layers, output))
    except SkipVariant as why:
        raise NotKept("skipped", str(why)) from None
    except OSError:
        raise
    except Exception as exc:  # a converter's own exception: this variant cannot be made here, the reason says why
        raise NotKept("skipped", f"{type(exc).__name__}: {exc}") from None
    run.progress(kind.id, "checking", "")
    runtime = runtime_for_format(kind.format).name
    try:
        outputs, latency, version = run_variant(produced.files[0], kind.format, run.data, run.src.inputs, run.src.outputs)
    except EdgefleetError as exc:
        raise NotKept("failed", f"does not run on {runtime}: {exc}") from None
    atol = run.tolerances.get(kind.id, run.tolerances.get(kind.precision))
    return _Attempt(produced, compare(outputs, run.reference, kind.precision, atol, run.src.outputs), latency, version)


MAX_FLOAT_RETRIES = 6


def _keep_layers_in_float(run: _Run, kind: VariantKind, work: Path, first: _Attempt) -> _Attempt:
    """int8 outside parity: keep 1, 2, 4 ... of the weighted layers feeding the worst output in float until it passes,
    or only float would be left. The last attempt is returned; a retry the converter refuses ends the retries."""
    attempt = first
    for i in range(MAX_FLOAT_RETRIES):
        count = 2**i
        if count >= first.produced.weighted_layers:  # all of them in float is no int8 variant
            return attempt
        output = worst_output(attempt.parity)
        run.progress(kind.id, "retrying", f"{failure(attempt.parity)}; keeping {count} layer(s) feeding {output!r} in float")
        try:
            nxt = _attempt(run, kind, work / str(count), count, output)
        except NotKept:
            return attempt
        attempt = nxt
        if attempt.parity.passed or len(attempt.produced.float_layers) < count:
            return attempt
    return attempt


def feeding_layers_of(run: _Run, kind: VariantKind, output: str) -> list[str]:
    """The weighted layers nearest ``output`` in an ONNX source: where to look when a variant misses parity there."""
    if run.src.format != "onnx":
        return []
    import onnx

    return feeding_layers(onnx.load(str(run.src.path)).graph, output, ONNX_WEIGHTED)[:4]


def _keep(run: _Run, kind: VariantKind, produced: Produced, parity: Parity, versions: dict[str, str]) -> Variant:
    """Move a passing variant's files into the bundle beside its golden samples; its manifest entry."""
    names = []
    for f in produced.files:
        dest = run.tmp / f.name
        f.rename(dest)
        names.append(dest.name)
    golden = f"golden_{kind.id}.npz"
    n = GOLDEN_COUNT if run.src.batch_dynamic and not produced.input_shapes else 1  # a fixed batch takes one sample
    ins = sample_io.take(run.data, run.src.inputs, 0, n)
    outs = sample_io.take(run.reference, run.src.outputs, 0, n)
    np.savez(run.tmp / golden, **{f"in:{k}": v for k, v in ins.items()}, **{f"out:{k}": v for k, v in outs.items()})  # type: ignore[arg-type]
    return Variant.model_validate(
        {
            "id": kind.id,
            "format": kind.format,
            "precision": kind.precision,
            "file": names[0],
            "extra_files": names[1:],
            "sha256": sha256_file(run.tmp / names[0]),
            "size": (run.tmp / names[0]).stat().st_size,
            "parity": parity,
            "min_runtime_version": versions,
            "static_shapes": run.src.static_shapes or bool(produced.input_shapes),
            "golden": golden,
            "input_shapes": produced.input_shapes,
            "float_layers": produced.float_layers,
        }
    )


def _check_outcome(run: _Run) -> None:
    """A failed variant fails the build unless failing ones are dropped; a build that kept nothing always fails."""
    failed = [r for r in run.report.variants if r.state == "failed"]
    if failed and not run.drop_failing:
        raise BuildError("variants failed: " + "; ".join(f"{r.id}: {r.reason}" for r in failed), run.report)
    if not run.kept:
        raise BuildError("no variant could be produced: " + "; ".join(f"{r.id}: {r.reason}" for r in run.report.variants), run.report)


def _write_manifest(run: _Run, name: str, version: str, synthetic: bool) -> Bundle:
    """``bundle.json`` in the temp dir, fsynced; the build's lock file goes with it."""
    src = run.src
    bundle = Bundle(
        name=name,
        version=version,
        created=datetime.now(timezone.utc),
        source_format=src.origin or src.format,  # type: ignore[arg-type]
        source_sha256=src.sha256,
        inputs=src.inputs,
        outputs=src.outputs,
        variants=run.kept,
        synthetic_samples=synthetic,
        skipped=run.skipped,
    )
    with open(run.tmp / BUNDLE_FILE, "w") as manifest:
        manifest.write(json.dumps(json.loads(bundle.model_dump_json()), indent=2) + "\n")
        manifest.flush()
        os.fsync(manifest.fileno())
    (run.tmp / LOCK_FILE).unlink()
    return bundle


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished bundle to ``out``; with --force the old bundle goes only once the new one is in place."""
    old: Path | None = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _archive(out: Path) -> Path:
    """``out.tar.gz``: the bundle as one file for transport, written atomically too."""
    target = out.parent / f"{out.name}.tar.gz"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp_name, "w:gz") as tar:
            for p in sorted(out.iterdir()):
                tar.add(p, arcname=p.name)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target
