"""Decide whether a signed update may be installed: both repositories must agree (Uptane).

``check_for_update`` refreshes the director (what this device must run) and the
image repository (what exists), both through ``tuf.ngclient`` — signatures,
thresholds, versions, expiry and root rotation are python-tuf's job — and then
applies the rules only edgefleet knows: the two must name the same bundle with
the same length, hashes and release counter; the release counter must not go
backwards; the chosen variant's hardware hints must fit this device. Only then is
the bundle downloaded (length- and hash-checked by the Updater) and returned.
Every refusal is an ``UpdateRejected`` with the reason the device reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from agent import BUILD_DATE
from agent.errors import EdgefleetError
from agent.hardware import HardwareProfile

__all__ = ["TrustedRepos", "UpdateRejected", "VerifiedUpdate", "check_clock", "check_for_update"]


class UpdateRejected(EdgefleetError):
    """The update was refused; ``str(exc)`` is the reason reported on the job topic."""

    code = "rejected"


@dataclass(frozen=True)
class VerifiedUpdate:
    target_path: str
    model: str
    version: str
    variant: str
    release_counter: int
    archive: Path  # the downloaded bundle archive, length- and hash-verified


@dataclass
class TrustedRepos:
    """Where this device keeps each repository's trusted metadata and how it reaches them."""

    image_dir: Path
    director_dir: Path
    image_url: str
    director_url: str
    image_fetcher: FetcherInterface
    director_fetcher: FetcherInterface
    downloads: Path

    def updaters(self) -> tuple[Updater, Updater]:
        self.downloads.mkdir(parents=True, exist_ok=True)
        image = Updater(
            str(self.image_dir),
            self.image_url + "metadata/",
            str(self.downloads),
            self.image_url + "targets/",
            fetcher=self.image_fetcher,
            bootstrap=None,
        )
        director = Updater(
            str(self.director_dir), self.director_url + "metadata/", None, None, fetcher=self.director_fetcher, bootstrap=None
        )
        return image, director


def _hints_fit(hints: list[str], profile: HardwareProfile) -> str | None:
    needs = {"edgetpu": profile.has_coral, "cuda": profile.has_cuda_gpu, "intel_npu": profile.intel_npu}
    for hint in hints:
        if hint in needs and not needs[hint]:
            return hint
    return None


def check_clock(now: datetime | None = None) -> None:
    """Refuse to judge expiry with a clock that is obviously wrong (earlier than this agent was built).

    Why: a device whose RTC reset to 1970 would take expired (frozen) metadata for
    fresh, and one far in the future would refuse everything; the first is the attack.
    """
    now = now or datetime.now(timezone.utc)
    built = datetime.fromisoformat(BUILD_DATE).replace(tzinfo=timezone.utc)
    if now < built:
        raise UpdateRejected(f"the clock says {now:%Y-%m-%d}, before this agent was built ({BUILD_DATE}): fix the time (NTP) first")


def check_for_update(
    repos: TrustedRepos, installed: dict[str, int], profile: HardwareProfile, now: datetime | None = None
) -> VerifiedUpdate | None:
    """The update this device should install now, verified and downloaded; ``None`` when it runs it already."""
    check_clock(now)
    try:
        return _check(repos, installed, profile)
    except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:  # e.g. a delegated role fetched by get_targetinfo
        raise UpdateRejected(f"{type(exc).__name__}: {exc}") from exc
    except (KeyError, ValueError, TypeError) as exc:  # signed, but custom fields not in the shape we publish
        raise UpdateRejected(f"malformed target metadata: {type(exc).__name__}: {exc}") from exc


def _check(repos: TrustedRepos, installed: dict[str, int], profile: HardwareProfile) -> VerifiedUpdate | None:
    image, director = repos.updaters()
    try:
        director.refresh()
        image.refresh()
    except tuf_errors.RepositoryError as exc:  # bad signatures, expired or rolled-back metadata, root rotation gone wrong
        raise UpdateRejected(f"metadata refused: {type(exc).__name__}: {exc}") from exc
    except tuf_errors.DownloadError as exc:
        raise UpdateRejected(f"repository unreachable: {exc}") from exc
    # The director's verified targets, as the Updater persisted them after refresh().
    wanted: Metadata[Targets] = Metadata.from_file(str(repos.director_dir / "targets.json"))
    if len(wanted.signed.targets) != 1:
        raise UpdateRejected(f"the director names {len(wanted.signed.targets)} targets; a device runs exactly one")
    path, dtarget = next(iter(wanted.signed.targets.items()))
    dcustom: dict[str, Any] = dtarget.unrecognized_fields.get("custom", {})
    itarget = image.get_targetinfo(path)
    if itarget is None:
        raise UpdateRejected(f"the director names {path}, which the image repository does not have")
    icustom: dict[str, Any] = itarget.unrecognized_fields.get("custom", {})
    if dtarget.length != itarget.length or dtarget.hashes != itarget.hashes:
        raise UpdateRejected(f"director and image repository disagree on {path} (length or hashes)")
    counter = int(icustom.get("release_counter", -1))
    if int(dcustom.get("release_counter", -2)) != counter:
        raise UpdateRejected(f"director and image repository disagree on the release counter of {path}")
    model = str(icustom.get("model", ""))
    current = installed.get(model)
    if current is not None and counter < current:
        raise UpdateRejected(f"{path} has release counter {counter}, lower than the installed {current} (rollback)")
    if current == counter:
        return None
    variants = {v["id"]: v for v in icustom.get("variants", [])}
    variant = variants.get(str(dcustom.get("variant")))
    if variant is None:
        raise UpdateRejected(f"{path} has no variant {dcustom.get('variant')!r}")
    misfit = _hints_fit(list(variant.get("hints", [])), profile)
    if misfit is not None:
        raise UpdateRejected(f"variant {variant['id']} needs {misfit}, which this device does not have")
    try:
        archive = Path(image.download_target(itarget))
    except tuf_errors.LengthOrHashMismatchError as exc:
        raise UpdateRejected(f"{path}: downloaded bytes do not match the signed length/hash") from exc
    except tuf_errors.DownloadError as exc:
        raise UpdateRejected(f"{path}: download failed: {exc}") from exc
    return VerifiedUpdate(path, model, str(icustom.get("version", "")), variant["id"], counter, archive)
