"""The update machine: the Installer drives a job through ``agent.update.steps`` and changes what is installed.

It runs a job to a final state (``run``), picks up one a crash interrupted (``resume``), serves what is
installed at start (``restore``), switches a model back to its previous version (``rollback``) and keeps a
bounded number of versions on disk (``prune``). The states themselves are entered only in ``steps``.

A *shadow* job (shadow mode) goes through the same states and ends in ``SHADOW``: the model is loaded beside
the active version and fed its live inputs, serving nobody. When the director later names that artifact to
run, its job skips the download (the bytes are installed and verified) and the loaded shadow is swapped in
without loading it again; the same skip makes a fleet rollback to a kept version instant.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import logs
from agent.bundle import load_bundle, verify_variant
from agent.errors import EdgefleetError
from agent.hardware import HardwareProfile
from agent.runtimes import probe_all
from agent.runtimes.hints import InputHints
from agent.selection import choose
from agent.serve.host import ModelHost, ServingModel
from agent.update import steps
from agent.update.fetch import ChunkSource, DiskFull
from agent.update.jobs import Job, State
from agent.update.store import InstalledModel, UpdateStore
from agent.update.verify import Installed, RepositoryUnreachable, UpdateRejected, VerifiedUpdate

__all__ = ["HealthPolicy", "Installer", "RollbackError"]

log = logging.getLogger("edgefleet.installer")


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
        store: UpdateStore,
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
        self.disk = steps.Disk(state_dir / "downloads", state_dir / "staging", state_dir / "models")
        for d in (self.disk.downloads, self.disk.staging, self.disk.models):
            d.mkdir(parents=True, exist_ok=True)

    def _context(self) -> steps.Context:
        """Built per use: ``reload`` changes the reserve and the health policy between jobs."""
        return steps.Context(self.store, self.disk, self.host, self.load, self.report, self.disk_reserve, self.sync_bytes)

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
        ctx = self._context()
        current = self.store.unfinished_job()
        if current is not None:
            if current.update.sha256 == update.sha256 and current.shadow == shadow:
                return current
            steps.fail(ctx, current, f"superseded by {update.target_path}")
        return steps.create(ctx, update, shadow)

    def resume(self, job: Job, max_health_attempts: int = 2) -> Job:
        """An unfinished job found at start; one that died in its health check too often is rejected."""
        if job.state == State.HEALTH_CHECK:
            job.attempts += 1
            self.store.save_job(job)
            if job.attempts > max_health_attempts:
                steps.reject(self._context(), job, f"the agent died {job.attempts} times during the health check of this model")
        logs.event(log, "update.resume", job=job.id, state=job.state, offset=job.offset)
        return job

    def run(self, job: Job, source: ChunkSource) -> Job:
        """Drive ``job`` to a final state. ``RepositoryUnreachable`` leaves it resumable where it stopped."""
        ctx = self._context()
        while not job.final:
            try:
                steps.STEPS[job.state](ctx, job, source)
            except RepositoryUnreachable:
                raise
            except DiskFull as exc:
                steps.fail(ctx, job, str(exc))
            except UpdateRejected as exc:
                steps.reject(ctx, job, str(exc))
            except OSError as exc:  # the device's own storage misbehaving
                steps.fail(ctx, job, f"{type(exc).__name__}: {exc}")
        if job.state == State.ACTIVE:
            self._prune(job.update.model)
        return job

    # -- loading, rollback, housekeeping ---------------------------------------

    def load(self, m: InstalledModel, probation: bool = True) -> ServingModel:
        """Load ``m`` on the runtime selection picks and pass its golden samples and latency budget."""
        root = Path(m.path)
        bundle = load_bundle(root)
        variant = bundle.variant(m.variant)
        verify_variant(variant, root)
        candidates = [mv for mv in bundle.model_variants(root) if mv.path.name == variant.file]
        h = self.health
        golden = bundle.golden_samples(root, variant)
        # Warmed up on the golden inputs (shapes the model is known to accept), with the bundle's batch axes.
        hints = InputHints(tuple(g.inputs for g in golden), {t.name: t.batch_axis for t in [*bundle.inputs, *bundle.outputs]})
        sel, ranking = choose(
            self.profile,
            probe_all(self.health.enabled),
            candidates,
            golden,
            force_runtime=h.force_runtime,
            force_device=h.force_device,
            options=h.options,
            latency_budget_s=h.latency_budget_s,
            hints=hints,
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
            steps.roll_back(self._context(), active, previous, reason)
            logs.event(log, "update.rolled_back", model=model, frm=active.version, to=previous.version, reason=reason)
            return previous
        raise RollbackError(f"{model}: no kept version to roll back to")

    def _prune(self, model: str) -> None:
        """Keep the active version and ``keep_versions`` - 1 previous ones on disk."""
        kept = [m for m in self.store.installed(model) if m.status not in ("active", "shadow")]
        for m in kept[self.keep_versions - 1 :]:
            self.store.forget(m.sha256)
            shutil.rmtree(m.path, ignore_errors=True)
