"""The update state machine: the one class that moves a job between states and changes what is installed.

``IDLE → DOWNLOADING(offset) → VERIFYING → STAGED → HEALTH_CHECK → ACTIVE``, or
``FAILED`` / ``REJECTED`` with a reason, or later ``ROLLED_BACK``. Each state is
committed to SQLite *before* its work starts, and each step's work is idempotent,
so after a ``kill -9`` ``resume()`` redoes the interrupted step: a download continues
from its last verified chunk, verification and staging start that step over, a
health check runs again. Files move by rename only, so a directory under
``models/`` is either a complete verified bundle or not there at all.

A *shadow* job (shadow mode) goes through the same states and ends in ``SHADOW``:
the model is loaded beside the active version and fed its live inputs, serving
nobody. When the director later names that artifact to run, its job skips the
download (the bytes are installed and verified) and the loaded shadow is swapped
in without loading it again; the same skip makes a fleet rollback to a kept
version instant.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import logs
from agent.bundle import BundleError, load_bundle, verify_variant
from agent.chunks import ChunkManifest
from agent.errors import EdgefleetError, UnsafeArchive
from agent.files import sha256_file
from agent.hardware import HardwareProfile
from agent.runtimes import probe_all
from agent.selection import choose
from agent.serve.host import ModelHost, ServingModel
from agent.store import AgentStore, InstalledModel, Job, State
from agent.update import safe_tar
from agent.update.download import ChunkSource, DiskFull, check_disk_space, download
from agent.update.verify import Installed, RepositoryUnreachable, UpdateRejected, VerifiedUpdate

__all__ = ["HealthPolicy", "Installer", "RollbackError"]

log = logging.getLogger("edgefleet.installer")


PAUSE_ENV = "EDGEFLEET_FAULT_PAUSE_AT"


def _fault_pause(state: str) -> None:
    """Fault injection for the kill -9 tests: with ``EDGEFLEET_FAULT_PAUSE_AT=<STATE>`` the agent stops dead
    once that state is committed (DOWNLOADING: after the first verified chunk), so a test can kill it there."""
    if os.environ.get(PAUSE_ENV) == state:
        logs.event(log, "fault.paused", logging.WARNING, state=state)
        threading.Event().wait()


class RollbackError(EdgefleetError):
    code = "rollback_failed"


@dataclass(frozen=True)
class HealthPolicy:
    """How a new model proves itself before it serves (settings ``update.*`` and ``runtime.*``)."""

    latency_budget_s: float | None = None
    force_runtime: str | None = None
    force_device: str | None = None
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    enabled: tuple[str, ...] | None = None  # runtime.enabled


class Installer:
    def __init__(
        self,
        store: AgentStore,
        state_dir: Path,
        host: ModelHost,
        profile: HardwareProfile,
        health: HealthPolicy | None = None,
        keep_versions: int = 2,
        disk_reserve: int = 16 * 1024 * 1024,
        report: Callable[[Job], None] | None = None,
        sync_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.sync_bytes = sync_bytes
        self.store, self.host, self.profile = store, host, profile
        self.health = health or HealthPolicy()
        self.keep_versions, self.disk_reserve = max(1, keep_versions), disk_reserve
        self.report = report or (lambda job: None)
        self.downloads = state_dir / "downloads"
        self.staging = state_dir / "staging"
        self.models = state_dir / "models"
        for d in (self.downloads, self.staging, self.models):
            d.mkdir(parents=True, exist_ok=True)

    # -- what the update check needs to know ------------------------------------

    def installed(self) -> dict[str, Installed]:
        """Per model: the active artifact, with the highest release counter ever installed (anti-rollback)."""
        out: dict[str, Installed] = {}
        everything = [m for m in self.store.installed() if m.status != "shadow"]  # a shadow never served: no floor
        for model, m in self.store.active().items():
            highest = max(x.release_counter for x in everything if x.model == model)
            out[model] = Installed(highest, m.sha256)
        return out

    def kept(self) -> set[str]:
        return {m.sha256 for m in self.store.installed() if m.status == "kept"}

    # -- driving a job -----------------------------------------------------------

    def start(self, update: VerifiedUpdate, shadow: bool = False) -> Job | None:
        """A new job for ``update`` (``None`` when this artifact was refused before); an unfinished other job is abandoned."""
        if self.store.refused(update.sha256) is not None:
            return None
        current = self.store.unfinished_job()
        if current is not None:
            if current.sha256 == update.sha256 and current.shadow == int(shadow):
                return current
            self._finish(current, State.FAILED, f"superseded by {update.target_path}")
        now = time.time()
        job = Job(
            id=f"{now:.0f}-{uuid.uuid4().hex[:8]}",
            target_path=update.target_path,
            model=update.model,
            version=update.version,
            variant=update.variant,
            release_counter=update.release_counter,
            length=update.length,
            sha256=update.sha256,
            url=update.url,
            chunks=update.chunks.encode().decode(),
            created=now,
            shadow=int(shadow),
        )
        self._enter(job, State.IDLE)
        return job

    def resume(self, job: Job, max_health_attempts: int = 2) -> Job:
        """An unfinished job found at start; one that died in its health check too often is rejected."""
        if job.state == State.HEALTH_CHECK:
            job.attempts += 1
            self.store.save_job(job)
            if job.attempts > max_health_attempts:
                self._finish(job, State.REJECTED, f"the agent died {job.attempts} times during the health check of this model", refuse=True)
        logs.event(log, "update.resume", job=job.id, state=job.state, offset=job.offset)
        return job

    def run(self, job: Job, source: ChunkSource) -> Job:
        """Drive ``job`` to a final state. ``RepositoryUnreachable`` leaves it resumable where it stopped."""
        steps: dict[str, Callable[[Job, ChunkSource], None]] = {
            State.IDLE: self._begin_download,
            State.DOWNLOADING: self._download,
            State.VERIFYING: self._verify,
            State.STAGED: self._stage_done,
            State.HEALTH_CHECK: self._health_check,
        }
        while job.state not in State.FINAL:
            try:
                steps[job.state](job, source)
            except RepositoryUnreachable:
                raise
            except DiskFull as exc:
                self._finish(job, State.FAILED, str(exc))
            except UpdateRejected as exc:
                self._finish(job, State.REJECTED, str(exc), refuse=True)
            except OSError as exc:  # the device's own storage misbehaving
                self._finish(job, State.FAILED, f"{type(exc).__name__}: {exc}")
        return job

    def _enter(self, job: Job, state: str, reason: str = "") -> None:
        job.state, job.reason = state, reason
        self.store.save_job(job)
        logs.event(log, "update.state", job=job.id, state=state, target=job.target_path, offset=job.offset, reason=reason)
        self.report(job)
        if state != State.DOWNLOADING:
            _fault_pause(state)

    def _finish(self, job: Job, state: str, reason: str, refuse: bool = False) -> None:
        self._cleanup(job)
        if refuse:
            self.store.refuse(job.sha256, job.target_path, reason)
        self._enter(job, state, reason)

    def _cleanup(self, job: Job) -> None:
        self._archive(job).unlink(missing_ok=True)
        shutil.rmtree(self._staging(job), ignore_errors=True)
        installed = {m.sha256 for m in self.store.installed()}
        if job.sha256 not in installed:
            shutil.rmtree(self._model_dir(job.sha256), ignore_errors=True)

    def _archive(self, job: Job) -> Path:
        return self.downloads / f"{job.sha256}.part"

    def _staging(self, job: Job) -> Path:
        return self.staging / job.id

    def _model_dir(self, sha256: str) -> Path:
        return self.models / sha256[:32]

    # -- the steps ---------------------------------------------------------------

    def _begin_download(self, job: Job, source: ChunkSource) -> None:
        if any(m.sha256 == job.sha256 for m in self.store.installed()) and self._model_dir(job.sha256).is_dir():
            self._enter(job, State.STAGED, "installed already (a shadow or a kept version): no download")
            return
        # The archive and its extracted copy both sit on disk until the archive is deleted after staging.
        check_disk_space(self.downloads, 2 * job.length, self.disk_reserve)
        job.offset = 0
        self._enter(job, State.DOWNLOADING)

    def _download(self, job: Job, source: ChunkSource) -> None:
        update = self._update(job)

        def progress(offset: int) -> None:
            job.offset = offset
            self.store.save_job(job)
            _fault_pause(State.DOWNLOADING)

        download(update, source, self._archive(job), job.offset, progress, sync_bytes=self.sync_bytes)
        self._enter(job, State.VERIFYING)

    def _verify(self, job: Job, source: ChunkSource) -> None:
        archive = self._archive(job)
        if not archive.is_file() or archive.stat().st_size != job.length or sha256_file(archive) != job.sha256:
            job.offset = 0  # the chunks verified but the whole does not: never reuse any of it
            archive.unlink(missing_ok=True)
            raise UpdateRejected(f"{job.target_path}: the downloaded file does not match its signed length and sha256")
        staging = self._staging(job)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            # Our own checks, not extractall(filter=...), which Debian 12's Python 3.11.2 lacks. A plain tar holds at
            # most its own length in file bytes, the length IDLE reserved disk space for: the signed length is the bound.
            safe_tar.extract_path(archive, staging, bound=job.length)
            bundle = load_bundle(staging)
            if (bundle.name, bundle.version) != (job.model, job.version):
                raise BundleError(f"the artifact holds {bundle.name} {bundle.version}, signed as {job.model} {job.version}")
            verify_variant(bundle.variant(job.variant), staging)
        except (tarfile.TarError, UnsafeArchive, BundleError) as exc:
            raise UpdateRejected(f"{job.target_path}: {exc}") from exc
        final = self._model_dir(job.sha256)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        self._enter(job, State.STAGED)

    def _stage_done(self, job: Job, source: ChunkSource) -> None:
        self._archive(job).unlink(missing_ok=True)
        if not self._model_dir(job.sha256).is_dir():  # lost between crash and restart: fetch again
            job.offset = 0
            self._enter(job, State.IDLE)
            return
        self._enter(job, State.HEALTH_CHECK)

    def _health_check(self, job: Job, source: ChunkSource) -> None:
        installed = InstalledModel(
            job.sha256,
            job.model,
            job.version,
            job.variant,
            job.release_counter,
            job.target_path,
            str(self._model_dir(job.sha256)),
            "staged",
        )
        serving = None if job.shadow else self.host.take_shadow(job.model, job.sha256)
        if serving is not None:  # promoted: loaded and health-checked when it became the shadow
            serving.on_probation = True
        else:
            try:
                serving = self.load(installed, probation=not job.shadow)
            except EdgefleetError as exc:
                raise UpdateRejected(f"health check: {exc}") from exc
        if job.shadow:
            self.host.set_shadow(serving)
            replaced = self.store.add_shadow(job, installed)
            if replaced is not None:
                self._discard(replaced)
            logs.event(log, "update.state", job=job.id, state=State.SHADOW, target=job.target_path, runtime=serving.runtime.name)
            self.report(job)
            return
        self.host.swap(serving)
        self.store.activate(job, installed)
        logs.event(log, "update.state", job=job.id, state=State.ACTIVE, target=job.target_path, runtime=serving.runtime.name)
        self.report(job)
        self._prune(job.model)
        _fault_pause(State.ACTIVE)

    def _update(self, job: Job) -> VerifiedUpdate:
        chunks = ChunkManifest.decode(job.chunks.encode())
        return VerifiedUpdate(
            job.target_path, job.model, job.version, job.variant, job.release_counter, job.length, job.sha256, job.url, chunks
        )

    # -- loading, rollback, housekeeping ---------------------------------------

    def load(self, m: InstalledModel, probation: bool = True) -> ServingModel:
        """Load ``m`` on the runtime selection picks and pass its golden samples and latency budget."""
        root = Path(m.path)
        bundle = load_bundle(root)
        variant = bundle.variant(m.variant)
        verify_variant(variant, root)
        candidates = [mv for mv in bundle.model_variants(root) if mv.path.name == variant.file]
        h = self.health
        sel, ranking = choose(
            self.profile,
            probe_all(self.health.enabled),
            candidates,
            bundle.golden_samples(root, variant),
            force_runtime=h.force_runtime,
            force_device=h.force_device,
            options=h.options,
            latency_budget_s=h.latency_budget_s,
        )
        passed_over = [(w, why) for w, why in ranking.excluded + sel.attempts if ":" in w][:8]
        return ServingModel(m.model, m.version, m.variant, m.sha256, sel.runtime, on_probation=probation, passed_over=passed_over)

    def drop_shadow(self, model: str, reason: str) -> InstalledModel | None:
        """Stop running ``model``'s shadow (the director no longer names it) and delete it unless it serves now."""
        shadow = self.store.shadows().get(model)
        self.host.remove_shadow(model)
        if shadow is None:
            return None
        self.store.forget(shadow.sha256)
        self._discard(shadow)
        logs.event(log, "update.shadow_dropped", model=model, version=shadow.version, reason=reason)
        return shadow

    def _discard(self, m: InstalledModel) -> None:
        if not any(x.sha256 == m.sha256 for x in self.store.installed()):
            shutil.rmtree(m.path, ignore_errors=True)

    def restore(self) -> list[str]:
        """At start: serve each model's active version (or, if it no longer loads, the newest kept one), and its shadow."""
        problems = []
        for model, m in self.store.shadows().items():
            try:
                self.host.set_shadow(self.load(m, probation=False))
            except EdgefleetError as exc:
                problems.append(f"shadow {model} {m.version}: {exc}")
                self.drop_shadow(model, f"no longer loads: {exc}")
        for model, m in self.store.active().items():
            try:
                self.host.swap(self.load(m, probation=False))
            except EdgefleetError as exc:
                problems.append(f"{model} {m.version}: {exc}")
                try:
                    self.rollback(model, f"the active version no longer loads: {exc}")
                except RollbackError as rexc:
                    problems.append(str(rexc))
        return problems

    def rollback(self, model: str, reason: str = "requested") -> InstalledModel:
        """Back to the newest kept version of ``model``, swapped in the same way as an update."""
        active = self.store.active().get(model)
        if active is None:
            raise RollbackError(f"{model} is not installed")
        for previous in (m for m in self.store.installed(model) if m.status == "kept"):
            try:
                serving = self.load(previous, probation=False)
            except EdgefleetError as exc:
                logs.event(log, "rollback.candidate_failed", logging.WARNING, model=model, version=previous.version, reason=str(exc))
                continue
            self.host.swap(serving)
            self.store.roll_back(active, previous, reason)
            logs.event(log, "update.rolled_back", model=model, frm=active.version, to=previous.version, reason=reason)
            for job in self.store.jobs():
                if job.sha256 == active.sha256 and job.state == State.ROLLED_BACK:
                    self.report(job)
            return previous
        raise RollbackError(f"{model}: no kept version to roll back to")

    def _prune(self, model: str) -> None:
        """Keep the active version and ``keep_versions`` - 1 previous ones on disk."""
        kept = [m for m in self.store.installed(model) if m.status not in ("active", "shadow")]
        for m in kept[self.keep_versions - 1 :]:
            self.store.forget(m.sha256)
            shutil.rmtree(m.path, ignore_errors=True)
