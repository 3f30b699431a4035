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
from converters.parity import compare, run_variant
from converters.source import Source, open_source
from converters.variants import KINDS, VariantKind

__all__ = ["BuildReport", "VariantReport", "build", "DEFAULT_VARIANTS", "GOLDEN_COUNT"]

DEFAULT_VARIANTS = tuple(KINDS)
GOLDEN_COUNT = 4
Progress = Callable[[str, str, str], None]  # (variant id, state, detail)


@dataclass
class VariantReport:
    id: str
    state: str  # ok | failed | dropped | skipped | error
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
) -> BuildReport:
    """Build the bundle ``out`` from ``source``; see the module docstring for the guarantees.

    ``tolerances`` maps a variant id (``onnx-int8``) or a precision (``int8``) to an
    absolute error tolerance (scaled by the output magnitude) that replaces the default.
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
    try:
        return _build(src, name, version, out, samples, wanted, tolerances or {}, drop_failing, archive, progress)
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
    kept: list[Variant] = field(default_factory=list)
    skipped: dict[str, NotBuilt] = field(default_factory=dict)

    def give_up(self, vid: str, state: str, reason: str, work: Path, detail: str | None = None) -> None:
        """Record a variant that is not kept, tell the caller, and drop its work directory."""
        if state in ("skipped", "dropped", "failed"):
            self.skipped[vid] = NotBuilt.model_validate({"state": state, "reason": reason})
        self.report.variants.append(VariantReport(vid, state, reason))
        self.progress(vid, state, reason if detail is None else detail)
        shutil.rmtree(work)


def _build(
    src: Source,
    name: str,
    version: str,
    out: Path,
    samples: str | Path | None,
    wanted: list[str],
    tolerances: dict[str, float],
    drop_failing: bool,
    archive: bool,
    progress: Progress,
) -> BuildReport:
    """Make each wanted variant in a temp dir beside ``out``, then write the manifest and move the whole into place."""
    data, synthetic = _samples(src, samples)
    reference = src.reference(data)
    report = BuildReport(out, None, synthetic)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    lock = open(tmp / LOCK_FILE, "wb")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        run = _Run(src, out, tmp, data, reference, tolerances, drop_failing, progress, report)
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


def _samples(src: Source, samples: str | Path | None) -> tuple[dict[str, np.ndarray], bool]:
    """The user's samples, or synthetic ones when none were given (and whether they are synthetic)."""
    if samples is not None:
        return sample_io.load(Path(samples), src.inputs), False
    return sample_io.synthetic(src.inputs), True


def _make_variant(run: _Run, vid: str) -> None:
    """Produce one variant, check its parity on its runtime, and keep it when it passes."""
    kind = KINDS[vid]
    run.progress(vid, "converting", "")
    work = run.tmp / f".work-{vid}"
    work.mkdir()
    files = _produce(run, kind, work)
    if files is None:
        return
    run.progress(vid, "checking", "")
    runtime = runtime_for_format(kind.format).name
    try:
        outputs, latency, rt_version = run_variant(files[0], kind.format, run.data, run.src.batch_dynamic)
    except EdgefleetError as exc:
        run.give_up(vid, "error", f"does not run on {runtime}: {exc}", work, detail=str(exc))
        return
    parity = compare(outputs, run.reference, kind.precision, run.tolerances.get(vid, run.tolerances.get(kind.precision)))
    state = "ok" if parity.passed else ("dropped" if run.drop_failing else "failed")
    reason = "" if parity.passed else _parity_failure(parity)
    run.report.variants.append(VariantReport(vid, state, reason, sum(f.stat().st_size for f in files), latency, parity))
    run.progress(vid, state, reason)
    if not parity.passed:
        shutil.rmtree(work)
        return
    run.kept.append(_keep(run, kind, files, parity, {runtime: rt_version}))
    shutil.rmtree(work)


def _produce(run: _Run, kind: VariantKind, work: Path) -> list[Path] | None:
    """The variant's files in ``work``, or None when it was skipped or its converter failed (recorded in the report)."""
    try:
        return kind.produce(run.src, work, run.data)
    except SkipVariant as why:
        run.give_up(kind.id, "skipped", str(why), work)
    except OSError:
        raise
    except EdgefleetError as exc:
        run.give_up(kind.id, "error", str(exc), work)
    except Exception as exc:  # a converter's own exception: this variant failed, the report says how
        run.give_up(kind.id, "error", f"{type(exc).__name__}: {exc}", work, detail=str(exc))
    return None


def _parity_failure(parity: Parity) -> str:
    top1 = f", top-1 {parity.top1_agreement:.1%} (minimum {parity.min_top1:.0%})" if parity.top1_agreement is not None else ""
    return f"max abs error {parity.max_abs_error:.3g} (tolerance {parity.atol:g})" + top1


def _keep(run: _Run, kind: VariantKind, files: list[Path], parity: Parity, versions: dict[str, str]) -> Variant:
    """Move a passing variant's files into the bundle beside its golden samples; its manifest entry."""
    names = []
    for f in files:
        dest = run.tmp / f.name
        f.rename(dest)
        names.append(dest.name)
    golden = f"golden_{kind.id}.npz"
    pairs = {f"in:{k}": v[:GOLDEN_COUNT] for k, v in run.data.items()} | {f"out:{k}": v[:GOLDEN_COUNT] for k, v in run.reference.items()}
    np.savez(run.tmp / golden, **pairs)  # type: ignore[arg-type]
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
            "static_shapes": run.src.static_shapes,
            "golden": golden,
        }
    )


def _check_outcome(run: _Run) -> None:
    """A failed variant fails the build unless failing ones are dropped; a build that kept nothing always fails."""
    failed = [r for r in run.report.variants if r.state in ("failed", "error")]
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
