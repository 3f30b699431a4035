"""Decide whether a signed update may be installed: both repositories must agree (Uptane).

``check_for_update`` refreshes the director (what this device must run) and the
image repository (what exists), both through ``tuf.ngclient`` — signatures,
thresholds, versions, expiry and root rotation are python-tuf's job — and then
applies the rules only edgefleet knows: the two must name the same bundle with
the same length, hashes, model, version, variant and release counter; the release
counter must not go backwards; the variant's hardware hints must fit this device.
The result names the artifact and its verified chunk list; ``agent.update.fetch``
fetches it resumably.
Besides the one target a device must run, the director may name one *shadow*
target of the same model (custom field ``shadow: true``): a candidate the device
runs beside the active version on live inputs without serving it (shadow mode).
It is verified exactly like the main target.
Every refusal is an ``UpdateRejected`` with the reason the device reports.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from agent import BUILD_DATE
from agent.chunks import CHUNKS_SUFFIX, ChunkManifest, ChunkManifestError
from agent.errors import EdgefleetError
from agent.hardware import HardwareProfile
from agent.update.mirrors import Sources, valid_mirrors

__all__ = [
    "MIRRORS_FIELD",
    "REVOKED_FIELD",
    "DirectorPlan",
    "Installed",
    "RepositoryUnreachable",
    "TrustedRepos",
    "UpdateRejected",
    "VerifiedUpdate",
    "check_clock",
    "check_director",
    "check_for_update",
    "signed_mirrors",
]


# The image repository's signed targets list revoked releases here (``fleet release revoke``); the agent names the
# revocation when it refuses a target, so an operator reading the device's reason knows why.
REVOKED_FIELD = "x-edgefleet-revoked"
# The director's signed targets may name HTTP(S) mirrors of the image repository here (``fleet director init
# --mirror``); safe to follow because a mirror only says where to look: every byte from it is verified.
MIRRORS_FIELD = "x-edgefleet-mirrors"


class UpdateRejected(EdgefleetError):
    """The update was refused; ``str(exc)`` is the reason reported on the job topic."""

    code = "rejected"


class RepositoryUnreachable(EdgefleetError):
    """No answer from a repository (broker down, controller away): try again later, nothing is wrong with the update."""

    code = "unreachable"


@dataclass(frozen=True)
class VerifiedUpdate:
    """What both repositories agree this device must install; the artifact itself is fetched by ``agent.update.fetch``."""

    target_path: str
    model: str
    version: str
    variant: str
    release_counter: int
    length: int
    sha256: str
    url: str  # where the artifact's bytes are, for the fetcher
    chunks: ChunkManifest  # verified through the image repository


@dataclass(frozen=True)
class Installed:
    """What a device runs of one model, as ``check_for_update`` compares it."""

    release_counter: int
    sha256: str


@dataclass(frozen=True)
class DirectorPlan:
    """What the director wants, verified: ``update`` to install (None: running it already), and the ``shadow``
    to run beside it (None: no shadow wanted; named even when already running, so the device can tell)."""

    update: VerifiedUpdate | None
    shadow: VerifiedUpdate | None = None


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

    def image_updater(self, fetcher: FetcherInterface | None = None) -> Updater:
        """The image repository through ``fetcher`` (default: ``image_fetcher``)."""
        self.downloads.mkdir(parents=True, exist_ok=True)
        return Updater(
            str(self.image_dir),
            self.image_url + "metadata/",
            str(self.downloads),
            self.image_url + "targets/",
            fetcher=fetcher or self.image_fetcher,
            bootstrap=None,
        )

    def director_updater(self) -> Updater:
        return Updater(str(self.director_dir), self.director_url + "metadata/", None, None, fetcher=self.director_fetcher, bootstrap=None)


def signed_mirrors(targets: Targets) -> list[str]:
    """The mirror URLs the director's verified targets name (``MIRRORS_FIELD``), the valid ones, in order."""
    urls = targets.unrecognized_fields.get(MIRRORS_FIELD, [])
    return valid_mirrors(urls if isinstance(urls, list) else [])


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
    repos: TrustedRepos,
    installed: Mapping[str, Installed],
    profile: HardwareProfile,
    now: datetime | None = None,
    kept: Collection[str] = (),
) -> VerifiedUpdate | None:
    """What this device should install now, verified; ``None`` when it runs it already (``check_director``'s update)."""
    return check_director(repos, installed, profile, now, kept).update


def check_director(
    repos: TrustedRepos,
    installed: Mapping[str, Installed],
    profile: HardwareProfile,
    now: datetime | None = None,
    kept: Collection[str] = (),
) -> DirectorPlan:
    """What this device should install and run in shadow now, both verified through both repositories.

    ``kept`` holds the sha256 of artifacts this device installed before and still
    keeps: the director may point back at one of those (a fleet rollback) even
    though its release counter is lower — the device ran those bytes already, so no
    attacker can use this to install anything new or old it never trusted.
    """
    check_clock(now)
    try:
        return _check(repos, installed, profile, kept)
    except tuf_errors.RepositoryError as exc:  # e.g. a delegated role fetched by get_targetinfo
        raise UpdateRejected(f"{type(exc).__name__}: {exc}") from exc
    except tuf_errors.DownloadHTTPError as exc:
        raise UpdateRejected(f"{type(exc).__name__}: {exc}") from exc
    except tuf_errors.DownloadError as exc:  # timeouts: the broker or the controller is away
        raise RepositoryUnreachable(f"repository unreachable: {exc}") from exc
    except (KeyError, ValueError, TypeError) as exc:  # signed, but custom fields not in the shape we publish
        raise UpdateRejected(f"malformed target metadata: {type(exc).__name__}: {exc}") from exc


def _check(repos: TrustedRepos, installed: Mapping[str, Installed], profile: HardwareProfile, kept: Collection[str]) -> DirectorPlan:
    _refresh(repos.director_updater())
    # The director's verified targets, as the Updater persisted them after refresh().
    wanted: Metadata[Targets] = Metadata.from_file(str(repos.director_dir / "targets.json"))
    image = _image(repos, wanted.signed)
    main = {p: t for p, t in wanted.signed.targets.items() if t.unrecognized_fields.get("custom", {}).get("shadow") is not True}
    shadows = {p: t for p, t in wanted.signed.targets.items() if p not in main}
    if len(main) != 1:
        raise UpdateRejected(f"the director names {len(main)} targets to run; a device runs exactly one")
    if len(shadows) > 1:
        raise UpdateRejected(f"the director names {len(shadows)} shadow targets; a device runs at most one")
    path, dtarget = next(iter(main.items()))
    itarget = _agreed(image, repos.image_dir, path, dtarget)
    model, sha256, counter = _identity(itarget)
    current = installed.get(model)
    update = None
    if current is None or current.sha256 != sha256:
        if current is not None and counter < current.release_counter and sha256 not in kept:
            raise UpdateRejected(f"{path} has release counter {counter}, lower than the installed {current.release_counter} (rollback)")
        update = _verified(image, repos, profile, path, itarget)
    shadow = None
    for spath, starget in shadows.items():
        sinfo = _agreed(image, repos.image_dir, spath, starget)
        smodel, ssha, scounter = _identity(sinfo)
        if smodel != model or ssha == sha256:
            raise UpdateRejected(f"shadow target {spath} must be another version of {model}, the model the device runs")
        if current is not None and scounter < current.release_counter:
            raise UpdateRejected(f"shadow target {spath} has release counter {scounter}, below the installed {current.release_counter}")
        shadow = _verified(image, repos, profile, spath, sinfo)
    return DirectorPlan(update, shadow)


def _refresh(updater: Updater) -> None:
    try:
        updater.refresh()
    except tuf_errors.RepositoryError as exc:  # bad signatures, expired or rolled-back metadata, root rotation gone wrong
        raise UpdateRejected(f"metadata refused: {type(exc).__name__}: {exc}") from exc
    except tuf_errors.DownloadError as exc:
        raise RepositoryUnreachable(f"repository unreachable: {exc}") from exc


def _image(repos: TrustedRepos, wanted: Targets) -> Updater:
    """The image repository, refreshed: from the mirrors first (the settings' and the director's), and when what
    they serve is refused or lacks a target the director names (a mirror behind the repository), once more from
    the MQTT repository alone, with every mirror refused for the round. ngclient persists only verified
    metadata, so the second refresh starts from trusted state."""
    sources = repos.image_fetcher
    if not isinstance(sources, Sources):
        image = repos.image_updater()
        _refresh(image)
        return image
    sources.add(signed_mirrors(wanted))
    if sources.usable():
        image = repos.image_updater()
        try:
            image.refresh()
            missing = [p for p in wanted.targets if image.get_targetinfo(p) is None]
            if not missing:
                return image
            reason = f"the mirrors' metadata lacks {missing[0]}"
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            reason = f"metadata refused: {type(exc).__name__}: {exc}"
        for mirror in sources.usable():
            sources.refuse(mirror, repos.image_url + "metadata/", reason)
    image = repos.image_updater(sources.last)
    _refresh(image)
    return image


def _identity(itarget: TargetFile) -> tuple[str, str, int]:
    custom: dict[str, Any] = itarget.unrecognized_fields.get("custom", {})
    return str(custom["model"]), itarget.hashes["sha256"], int(custom["release_counter"])


def _agreed(image: Updater, image_dir: Path, path: str, dtarget: TargetFile) -> TargetFile:
    """The image repository's target for a director target: the same bytes and the same fields, or refused."""
    dcustom: dict[str, Any] = dtarget.unrecognized_fields.get("custom", {})
    itarget = image.get_targetinfo(path)
    if itarget is None:
        raise UpdateRejected(f"the director names {path}, which the image repository does not have{_revoked_note(image_dir, dtarget)}")
    icustom: dict[str, Any] = itarget.unrecognized_fields.get("custom", {})
    if dtarget.length != itarget.length or dtarget.hashes != itarget.hashes:
        raise UpdateRejected(f"director and image repository disagree on {path} (length or hashes)")
    for field in ("release_counter", "model", "version", "variant"):
        if str(dcustom.get(field)) != str(icustom.get(field)):
            raise UpdateRejected(f"director and image repository disagree on the {field} of {path}")
    return itarget


def _revoked_note(image_dir: Path, dtarget: TargetFile) -> str:
    """The refusal's "; revoked …" suffix when the image repository's verified targets (ngclient persisted them after ``refresh``) record a
    revocation of the release the director names; "" otherwise, or when unreadable (the refusal stands either way)."""
    custom: dict[str, Any] = dtarget.unrecognized_fields.get("custom", {})
    try:
        records = Metadata.from_file(str(image_dir / "targets.json")).signed.unrecognized_fields.get(REVOKED_FIELD, [])
    except Exception:  # python-tuf raises several types; only the wording of the refusal depends on it
        return ""
    for r in records if isinstance(records, list) else []:
        if isinstance(r, dict) and (r.get("model"), r.get("version")) == (custom.get("model"), custom.get("version")):
            why = f": {str(r['reason'])[:200]}" if r.get("reason") else ""
            return f"; the image repository revoked {r.get('model')} {r.get('version')} at {r.get('revoked_at', '?')}{why}"
    return ""


def _verified(image: Updater, repos: TrustedRepos, profile: HardwareProfile, path: str, itarget: TargetFile) -> VerifiedUpdate:
    icustom: dict[str, Any] = itarget.unrecognized_fields.get("custom", {})
    misfit = _hints_fit(list(icustom.get("hints", [])), profile)
    if misfit is not None:
        raise UpdateRejected(f"variant {icustom['variant']} needs {misfit}, which this device does not have")
    chunks = _chunk_manifest(image, path, itarget.length, repos.image_fetcher)
    sha256 = itarget.hashes["sha256"]
    directory, sep, name = path.rpartition("/")
    url = f"{repos.image_url}targets/{directory}{sep}{sha256}.{name}"
    model, version, variant, counter = (str(icustom[k]) for k in ("model", "version", "variant", "release_counter"))
    return VerifiedUpdate(path, model, version, variant, int(counter), itarget.length, sha256, url, chunks)


def _download(image: Updater, info: TargetFile, sources: FetcherInterface) -> bytes:
    """A verified target's bytes; ones that fail their signed hash are refused with the mirror that served them and
    fetched from the next source (with the MQTT repository's, the update is refused)."""
    while True:
        try:
            return Path(image.download_target(info)).read_bytes()
        except tuf_errors.LengthOrHashMismatchError as exc:
            reason = f"{info.path}: downloaded bytes do not match the signed length/hash"
            if not (isinstance(sources, Sources) and sources.blame(reason)):
                raise UpdateRejected(reason) from exc


def _chunk_manifest(image: Updater, path: str, length: int, sources: FetcherInterface) -> ChunkManifest:
    info = image.get_targetinfo(path + CHUNKS_SUFFIX)
    if info is None:
        raise UpdateRejected(f"the image repository has no chunk list for {path}")
    try:
        manifest = ChunkManifest.decode(_download(image, info, sources))
    except ChunkManifestError as exc:
        raise UpdateRejected(str(exc)) from exc
    if manifest.length != length:
        raise UpdateRejected(f"the chunk list of {path} is for {manifest.length} bytes, the target has {length}")
    return manifest
