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

from agent.bundle import BUNDLE_FILE, Bundle, Parity, Variant
from agent.errors import EdgefleetError
from agent.files import sha256_file
from converters import samples as sample_io
from converters.errors import BuildError, SkipVariant
from converters.parity import RUNTIME_FOR_FORMAT, compare, run_variant
from converters.source import Source, open_source
from converters.variants import KINDS

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
    if samples is not None:
        data = sample_io.load(Path(samples), src.inputs)
        synthetic = False
    else:
        data = sample_io.synthetic(src.inputs)
        synthetic = True
    reference = src.reference(data)
    report = BuildReport(out, None, synthetic)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    lock = open(tmp / LOCK_FILE, "wb")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        kept: list[Variant] = []
        skipped: dict[str, str] = {}
        for vid in wanted:
            kind = KINDS[vid]
            progress(vid, "converting", "")
            work = tmp / f".work-{vid}"
            work.mkdir()
            try:
                files = kind.produce(src, work, data)
            except SkipVariant as why:
                skipped[vid] = str(why)
                report.variants.append(VariantReport(vid, "skipped", str(why)))
                progress(vid, "skipped", str(why))
                shutil.rmtree(work)
                continue
            except OSError:
                raise
            except EdgefleetError as exc:
                report.variants.append(VariantReport(vid, "error", str(exc)))
                progress(vid, "error", str(exc))
                shutil.rmtree(work)
                continue
            except Exception as exc:  # a converter's own exception: this variant failed, the report says how
                report.variants.append(VariantReport(vid, "error", f"{type(exc).__name__}: {exc}"))
                progress(vid, "error", str(exc))
                shutil.rmtree(work)
                continue
            progress(vid, "checking", "")
            try:
                outputs, latency, rt_version = run_variant(files[0], kind.format, data, src.batch_dynamic)
            except EdgefleetError as exc:
                report.variants.append(VariantReport(vid, "error", f"does not run on {RUNTIME_FOR_FORMAT[kind.format]}: {exc}"))
                progress(vid, "error", str(exc))
                shutil.rmtree(work)
                continue
            parity = compare(outputs, reference, kind.precision, tolerances.get(vid, tolerances.get(kind.precision)))
            size = sum(f.stat().st_size for f in files)
            state = "ok" if parity.passed else ("dropped" if drop_failing else "failed")
            reason = (
                ""
                if parity.passed
                else f"max abs error {parity.max_abs_error:.3g} (tolerance {parity.atol:g})"
                + (f", top-1 {parity.top1_agreement:.1%} (minimum {parity.min_top1:.0%})" if parity.top1_agreement is not None else "")
            )
            report.variants.append(VariantReport(vid, state, reason, size, latency, parity))
            progress(vid, state, reason)
            if not parity.passed:
                shutil.rmtree(work)
                continue
            names = []
            for f in files:
                dest = tmp / f.name
                f.rename(dest)
                names.append(dest.name)
            golden = f"golden_{vid}.npz"
            pairs = {f"in:{k}": v[:GOLDEN_COUNT] for k, v in data.items()} | {f"out:{k}": v[:GOLDEN_COUNT] for k, v in reference.items()}
            np.savez(tmp / golden, **pairs)  # type: ignore[arg-type]
            shutil.rmtree(work)
            kept.append(
                Variant.model_validate(
                    {
                        "id": vid,
                        "format": kind.format,
                        "precision": kind.precision,
                        "file": names[0],
                        "extra_files": names[1:],
                        "sha256": sha256_file(tmp / names[0]),
                        "size": (tmp / names[0]).stat().st_size,
                        "parity": parity,
                        "min_runtime_version": {RUNTIME_FOR_FORMAT[kind.format]: rt_version},
                        "static_shapes": src.static_shapes,
                        "golden": golden,
                    }
                )
            )
        failed = [r for r in report.variants if r.state in ("failed", "error")]
        if failed and not drop_failing:
            raise BuildError("variants failed: " + "; ".join(f"{r.id}: {r.reason}" for r in failed), report)
        if not kept:
            raise BuildError("no variant could be produced: " + "; ".join(f"{r.id}: {r.reason}" for r in report.variants), report)
        bundle = Bundle(
            name=name,
            version=version,
            created=datetime.now(timezone.utc),
            source_format=src.origin or src.format,  # type: ignore[arg-type]
            source_sha256=src.sha256,
            inputs=src.inputs,
            outputs=src.outputs,
            variants=kept,
            synthetic_samples=synthetic,
            skipped=skipped,
        )
        with open(tmp / BUNDLE_FILE, "w") as manifest:
            manifest.write(json.dumps(json.loads(bundle.model_dump_json()), indent=2) + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())
        (tmp / LOCK_FILE).unlink()
        old: Path | None = None
        if out.exists() or out.is_symlink():  # --force: the old bundle goes only once the new one is in place
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
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
