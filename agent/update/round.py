"""One update round: finish an interrupted job, ask the director what to run, plan the jobs, run them.

As balena-supervisor does, the round plans before it acts: ``plan`` turns the director's verified answer and
what is installed into a list of steps (install this, run that shadow, drop that one, nothing to do) and
does nothing itself; ``UpdateRound.run`` then executes the list in order. What a round will do can so be read,
and tested, apart from doing it.

The round owns its connection to the repositories (an ``MqttFetcher`` of its own, closed at the end), the image
repository's sources (``Sources``: the HTTP mirrors of the settings and of the director's verified metadata, then
that MQTT repository; the director always comes over MQTT: it is per device and online) and the trusted roots
under ``state_dir/trust``; what it tells the device's reporting goes through ``RoundHooks``.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tuf.api.metadata import Metadata, Targets

from agent import logs
from agent.hardware import HardwareProfile
from agent.mqtt import make_client
from agent.settings import BrokerSettings, UpdateSettings
from agent.update.fetch import MqttFetcher
from agent.update.machine import Installer
from agent.update.mirrors import Sources
from agent.update.store import InstalledModel
from agent.update.verify import (
    DirectorPlan,
    RepositoryUnreachable,
    TrustedRepos,
    UpdateRejected,
    VerifiedUpdate,
    check_director,
    signed_mirrors,
)

__all__ = ["DropShadow", "Install", "RoundHooks", "RoundStep", "UpToDate", "UpdateRound", "plan"]

log = logging.getLogger("edgefleet.agent")


@dataclass(frozen=True)
class Install:
    """Run a job for ``update`` (to serve it, or beside the served version when ``shadow``)."""

    update: VerifiedUpdate
    shadow: bool = False


@dataclass(frozen=True)
class DropShadow:
    """Stop and delete ``model``'s shadow."""

    model: str
    reason: str


@dataclass(frozen=True)
class UpToDate:
    """The director names nothing new to serve."""


RoundStep = Install | DropShadow | UpToDate


def plan(director: DirectorPlan, shadows: Mapping[str, InstalledModel]) -> list[RoundStep]:
    """What this round does with the director's answer, given the shadows installed now. Reads only."""
    steps: list[RoundStep] = [Install(director.update) if director.update is not None else UpToDate()]
    wanted = director.shadow
    steps += [DropShadow(model, "the director no longer names it") for model in shadows if wanted is None or wanted.model != model]
    current = shadows.get(wanted.model) if wanted is not None else None
    if wanted is not None and (current is None or current.sha256 != wanted.sha256):
        steps.append(Install(wanted, shadow=True))
    return steps


@dataclass(frozen=True)
class RoundHooks:
    """How the round reports what no job reports."""

    checked: Callable[[str, str], None]  # the round's outcome (state, reason) when no job ran: up_to_date, REJECTED
    changed: Callable[[], None]  # what the device runs changed outside a job (a shadow dropped): publish ``reported``


class UpdateRound:
    def __init__(self, installer: Installer, profile: HardwareProfile, device_id: str, state_dir: Path, hooks: RoundHooks) -> None:
        self.installer, self.profile, self.device_id, self.hooks = installer, profile, device_id, hooks
        self.trust = state_dir / "trust"
        self.metadata_downloads = state_dir / "metadata-downloads"
        self.mirror_refusals: Counter[str] = Counter()  # mirror URL -> times refused, over the agent's life

    def run(self, u: UpdateSettings, b: BrokerSettings) -> bool:
        """One round under the settings of the moment. False: the repositories were out of reach, try again soon."""
        try:
            fetcher = MqttFetcher(
                b.host,
                b.port,
                self.device_id,
                "repo://",
                u.request_chunk_kb * 1024,
                window=u.window,
                window_max=u.window_max,
                timeout=u.request_timeout_s,
                client=make_client(b, f"{self.device_id}-fetch"),
            )
        except (ConnectionError, OSError) as exc:
            logs.event(log, "update.unreachable", logging.WARNING, reason=str(exc))
            return False
        sources = Sources(fetcher, u.image_url, [*u.mirrors, *self._known_mirrors()], u.mirror_timeout_s)
        try:
            job = self.installer.store.unfinished_job()
            if job is not None:
                self.installer.run(self.installer.resume(job), sources)
            repos = self._repos(u, fetcher, sources)
            director = check_director(repos, self.installer.installed(), self.profile, kept=self.installer.kept())
            for step in plan(director, self.installer.store.shadows()):
                self._execute(step, sources)
            return True
        except RepositoryUnreachable as exc:
            logs.event(log, "update.unreachable", logging.WARNING, reason=str(exc))
            return False
        except UpdateRejected as exc:
            self.hooks.checked("REJECTED", str(exc))
            return True
        finally:
            fetcher.close()
            self.mirror_refusals.update(sources.refused)

    def _known_mirrors(self) -> list[str]:
        """The mirrors the director named last time (its verified targets, as ngclient persisted them): an interrupted
        download resumes from them before this round's director refresh."""
        try:
            targets: Metadata[Targets] = Metadata.from_file(str(self.trust / "director" / "targets.json"))
            return signed_mirrors(targets.signed)
        except Exception:  # none yet, or unreadable: the refresh will tell (python-tuf raises several types)
            return []

    def _execute(self, step: RoundStep, sources: Sources) -> None:
        if isinstance(step, Install):
            job = self.installer.start(step.update, shadow=step.shadow)
            if job is not None:
                self.installer.run(job, sources)
        elif isinstance(step, DropShadow):
            # None when the round's own update promoted that shadow meanwhile: nothing changed then
            if self.installer.drop_shadow(step.model, step.reason) is not None:
                self.hooks.changed()
        else:
            self.hooks.checked("up_to_date", "")

    def _repos(self, u: UpdateSettings, fetcher: MqttFetcher, sources: Sources) -> TrustedRepos:
        """Both repositories, trusting the roots kept under ``trust/`` (seeded from the settings the first time)."""
        image, director = self.trust / "image", self.trust / "director"
        for directory, seed in ((image, u.image_root), (director, u.director_root)):
            directory.mkdir(parents=True, exist_ok=True)
            if not (directory / "root.json").exists():
                if seed is None or not Path(seed).is_file():
                    raise UpdateRejected(f"no trusted root for {directory.name}: set update.{directory.name}_root")
                shutil.copy(seed, directory / "root.json")
        director_url = u.director_url.format(device_id=self.device_id)
        return TrustedRepos(image, director, u.image_url, director_url, sources, fetcher, self.metadata_downloads)
