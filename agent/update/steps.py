"""The update steps: one function per state, and the only code that moves a job into a state — final ones included.

``IDLE → DOWNLOADING(offset) → VERIFYING → STAGED → HEALTH_CHECK → ACTIVE`` (or ``SHADOW``), or ``FAILED`` /
``REJECTED`` with a reason, or later ``ROLLED_BACK``. Every move goes through ``_enter``, which checks it against
``agent.update.jobs.TRANSITIONS`` and commits the state to SQLite *before* the next step's work starts; each
step's work is idempotent, so after a ``kill -9`` the machine redoes the interrupted step: a download continues
from its last verified chunk, verification and staging start that step over, a health check runs again. Files
move by rename only, so a directory under ``models/`` is either a complete verified bundle or not there at all.

The steps hold no state of their own: what they work on (the store, the directories, the host, how to load a
model) arrives in a ``Context`` the machine builds from its current settings.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import logs
from agent.bundle import BundleError, load_bundle, verify_variant
from agent.errors import EdgefleetError, UnsafeArchive
from agent.files import sha256_file
from agent.serve.host import ModelHost, ServingModel
from agent.update import safe_tar
from agent.update.fetch import ChunkSource, check_disk_space, download
from agent.update.jobs import Job, State, check_transition
from agent.update.store import InstalledModel, UpdateStore
from agent.update.verify import UpdateRejected, VerifiedUpdate

__all__ = ["PAUSE_ENV", "STEPS", "Context", "Disk", "create", "fail", "reject", "roll_back"]

log = logging.getLogger("edgefleet.installer")

PAUSE_ENV = "EDGEFLEET_FAULT_PAUSE_AT"


def _fault_pause(state: State) -> None:
    """Fault injection for the kill -9 tests: with ``EDGEFLEET_FAULT_PAUSE_AT=<STATE>`` the agent stops dead
    once that state is committed (DOWNLOADING: after the first verified chunk), so a test can kill it there."""
    if os.environ.get(PAUSE_ENV) == state.value:
        logs.event(log, "fault.paused", logging.WARNING, state=state)
        threading.Event().wait()


@dataclass(frozen=True)
class Disk:
    """Where a job's files live: the partial download, the extraction in progress, the installed bundles."""

    downloads: Path
    staging: Path
    models: Path

    def archive(self, job: Job) -> Path:
        return self.downloads / f"{job.update.sha256}.part"

    def staging_dir(self, job: Job) -> Path:
        return self.staging / job.id

    def model_dir(self, sha256: str) -> Path:
        return self.models / sha256[:32]


@dataclass(frozen=True)
class Context:
    """What the steps work on, taken from the machine's settings of the moment (they change on reload)."""

    store: UpdateStore
    disk: Disk
    host: ModelHost
    load: Callable[[InstalledModel, bool], ServingModel]  # (model, on probation) -> loaded and health-checked
    report: Callable[[Job], None]
    disk_reserve: int
    sync_bytes: int


Step = Callable[[Context, Job, ChunkSource], None]


def _enter(ctx: Context, job: Job, to: State, reason: str = "", commit: Callable[[Job], None] | None = None, **fields: Any) -> None:
    """Move ``job`` to ``to``: checked against the table, committed (by ``commit`` when other rows change with it),
    logged, reported."""
    check_transition(job.state, to)
    job.state, job.reason = to, reason
    (commit or ctx.store.save_job)(job)
    logs.event(log, "update.state", job=job.id, state=to, target=job.update.target_path, offset=job.offset, reason=reason, **fields)
    ctx.report(job)
    if to != State.DOWNLOADING:  # DOWNLOADING pauses once a chunk is on disk, in _downloading
        _fault_pause(to)


# -- a job's beginning and ends ------------------------------------------------------


def create(ctx: Context, update: VerifiedUpdate, shadow: bool) -> Job:
    """A new job in IDLE, committed: the one way into the table."""
    now = time.time()
    job = Job(id=f"{now:.0f}-{uuid.uuid4().hex[:8]}", update=update, created=now, shadow=shadow)
    ctx.store.save_job(job)
    logs.event(log, "update.state", job=job.id, state=job.state, target=update.target_path, offset=0, reason="")
    ctx.report(job)
    _fault_pause(job.state)
    return job


def fail(ctx: Context, job: Job, reason: str) -> None:
    """FAILED: the device's side went wrong (its storage, a newer target); the same artifact may be tried again."""
    _cleanup(ctx, job)
    _enter(ctx, job, State.FAILED, reason)


def reject(ctx: Context, job: Job, reason: str) -> None:
    """REJECTED: the artifact is at fault, and refused from now on."""
    _cleanup(ctx, job)
    ctx.store.refuse(job.update.sha256, job.update.target_path, reason)
    _enter(ctx, job, State.REJECTED, reason)


def roll_back(ctx: Context, current: InstalledModel, previous: InstalledModel, reason: str) -> None:
    """ROLLED_BACK for the jobs that made ``current`` active, in one transaction with ``previous`` active again."""
    jobs = ctx.store.jobs_in(State.ACTIVE, current.sha256)
    for job in jobs:
        check_transition(job.state, State.ROLLED_BACK)
        job.state, job.reason = State.ROLLED_BACK, reason
    ctx.store.roll_back(current, previous, reason, jobs)
    for job in jobs:
        ctx.report(job)


def _cleanup(ctx: Context, job: Job) -> None:
    ctx.disk.archive(job).unlink(missing_ok=True)
    shutil.rmtree(ctx.disk.staging_dir(job), ignore_errors=True)
    if job.update.sha256 not in {m.sha256 for m in ctx.store.installed()}:
        shutil.rmtree(ctx.disk.model_dir(job.update.sha256), ignore_errors=True)


# -- one function per unfinished state -------------------------------------------------


def _idle(ctx: Context, job: Job, source: ChunkSource) -> None:
    sha256 = job.update.sha256
    if any(m.sha256 == sha256 for m in ctx.store.installed()) and ctx.disk.model_dir(sha256).is_dir():
        _enter(ctx, job, State.STAGED, "installed already (a shadow or a kept version): no download")
        return
    # The archive and its extracted copy both sit on disk until the archive is deleted after staging.
    check_disk_space(ctx.disk.downloads, 2 * job.update.length, ctx.disk_reserve)
    job.offset = 0
    _enter(ctx, job, State.DOWNLOADING)


def _downloading(ctx: Context, job: Job, source: ChunkSource) -> None:
    def progress(offset: int) -> None:
        job.offset = offset
        ctx.store.save_job(job)
        _fault_pause(State.DOWNLOADING)

    download(job.update, source, ctx.disk.archive(job), job.offset, progress, sync_bytes=ctx.sync_bytes)
    _enter(ctx, job, State.VERIFYING)


def _verifying(ctx: Context, job: Job, source: ChunkSource) -> None:
    u, archive = job.update, ctx.disk.archive(job)
    if not archive.is_file() or archive.stat().st_size != u.length or sha256_file(archive) != u.sha256:
        job.offset = 0  # the chunks verified but the whole does not: never reuse any of it
        archive.unlink(missing_ok=True)
        raise UpdateRejected(f"{u.target_path}: the downloaded file does not match its signed length and sha256")
    staging = ctx.disk.staging_dir(job)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # Our own checks, not extractall(filter=...), which Debian 12's Python 3.11.2 lacks. A plain tar holds at
        # most its own length in file bytes, the length IDLE reserved disk space for: the signed length is the bound.
        safe_tar.extract_path(archive, staging, bound=u.length)
        bundle = load_bundle(staging)
        if (bundle.name, bundle.version) != (u.model, u.version):
            raise BundleError(f"the artifact holds {bundle.name} {bundle.version}, signed as {u.model} {u.version}")
        verify_variant(bundle.variant(u.variant), staging)
    except (tarfile.TarError, UnsafeArchive, BundleError) as exc:
        raise UpdateRejected(f"{u.target_path}: {exc}") from exc
    final = ctx.disk.model_dir(u.sha256)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    _enter(ctx, job, State.STAGED)


def _staged(ctx: Context, job: Job, source: ChunkSource) -> None:
    ctx.disk.archive(job).unlink(missing_ok=True)
    if not ctx.disk.model_dir(job.update.sha256).is_dir():  # lost between crash and restart: fetch again
        job.offset = 0
        _enter(ctx, job, State.IDLE)
        return
    _enter(ctx, job, State.HEALTH_CHECK)


def _health_check(ctx: Context, job: Job, source: ChunkSource) -> None:
    u = job.update
    installed = InstalledModel(
        u.sha256, u.model, u.version, u.variant, u.release_counter, u.target_path, str(ctx.disk.model_dir(u.sha256)), "staged"
    )
    serving = None if job.shadow else ctx.host.take_shadow(u.model, u.sha256)
    if serving is not None:  # promoted: loaded and health-checked when it became the shadow
        serving.on_probation = True
    else:
        try:
            serving = ctx.load(installed, not job.shadow)
        except EdgefleetError as exc:
            raise UpdateRejected(f"health check: {exc}") from exc
    if job.shadow:
        before = ctx.store.shadows().get(u.model)
        ctx.host.set_shadow(serving)
        _enter(ctx, job, State.SHADOW, commit=lambda j: ctx.store.add_shadow(j, installed), runtime=serving.runtime.name)
        if before is not None and not any(x.sha256 == before.sha256 for x in ctx.store.installed()):
            shutil.rmtree(before.path, ignore_errors=True)  # the shadow this one replaced
        return
    ctx.host.swap(serving)
    _enter(ctx, job, State.ACTIVE, commit=lambda j: ctx.store.activate(j, installed), runtime=serving.runtime.name)


STEPS: Mapping[State, Step] = {
    State.IDLE: _idle,
    State.DOWNLOADING: _downloading,
    State.VERIFYING: _verifying,
    State.STAGED: _staged,
    State.HEALTH_CHECK: _health_check,
}
