"""The image repository (Uptane's name for it): which releases exist, signed with python-tuf.

Layout (consistent snapshots, as ``tuf.ngclient`` fetches them):
``metadata/{N}.root.json``, ``metadata/timestamp.json``, ``metadata/{N}.snapshot.json``,
``metadata/{N}.targets.json`` and ``targets/{model}/{version}/{sha256}.{variant}.tar``.
A release is one target per variant — a tar of ``bundle.json``, that variant's
files and its golden samples — so a Raspberry Pi pulls its int8 TFLite file and
not every runtime's copy. Each has a companion ``….tar.chunks`` target (per-chunk
sha256, see ``agent.chunks``). Custom fields carry the model name, version,
variant (format, precision, hints) and a per-model ``release_counter`` the agent
uses to refuse rollbacks.
Trust state changes in exactly one place: ``ImageRepository`` writes and signs, through the signing chain it shares
with the director (``fleet.tuf.metadata``: a key per role here, versions, commit, pruning, rotation).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp

from agent.bundle import BUNDLE_FILE, Bundle, BundleError, Variant, load_bundle, verify_files
from agent.chunks import CHUNK_SIZE, CHUNKS_SUFFIX, ChunkManifest
from agent.errors import EdgefleetError, UnsafeArchive
from agent.files import atomic_write
from agent.update import safe_tar
from agent.update.verify import REVOKED_FIELD
from fleet.tuf.keys import KeyStore
from fleet.tuf.metadata import (
    KEEP_VERSIONS,
    HoldsRoot,
    RotationError,
    SigningChain,
    committed_versions,
    encode,
    metadata_versions,
    prune_metadata,
    repository_lock,
    rotate_root,
    signing_time,
)

__all__ = [
    "IMAGE_ROLES",
    "Expiry",
    "ImageRepository",
    "Release",
    "ReleaseError",
    "ReleaseRevoked",
    "ReleasedVariant",
    "variant_target_path",
]

IMAGE_ROLES = ("targets", "snapshot", "timestamp")  # rotatable by `rotate_key`; root has `rotate_root`
SIGNED_BY = {"root": "root", "targets": "targets", "snapshot": "snapshot", "timestamp": "timestamp"}  # a key role per TUF role


class ReleaseError(EdgefleetError):
    """A release that cannot be added; the repository is unchanged."""

    code = "bad_release"


class ReleaseRevoked(EdgefleetError):
    """The release was revoked: it can be neither assigned, rolled out nor released again under that version."""

    code = "revoked"


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid; timestamp and snapshot are re-signed online."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)


@dataclass(frozen=True)
class ReleasedVariant:
    id: str
    target_path: str
    length: int
    sha256: str
    hints: tuple[str, ...] = ()


@dataclass(frozen=True)
class Release:
    model: str
    version: str
    release_counter: int
    variants: tuple[ReleasedVariant, ...]

    def variant(self, variant_id: str) -> ReleasedVariant | None:
        return next((v for v in self.variants if v.id == variant_id), None)


def variant_target_path(model: str, version: str, variant: str) -> str:
    return f"{model}/{version}/{variant}.tar"


class ImageRepository:
    """Trust state of the image repository changes here and nowhere else.

    Every writer holds ``repository_lock(directory)`` (one process and one thread at a time: ``fleet serve``'s
    re-signing, a ``fleet release`` and a ``fleet keys rotate`` may run at once) and publishes through
    ``commit_metadata``, where renaming ``timestamp.json`` is the commit. Readers (devices, ``targets()``) follow
    the timestamp, so they see the last committed state and never a half-written one.
    """

    def __init__(
        self, directory: str | Path, expiry: Expiry | None = None, chunk_size: int = CHUNK_SIZE, keep_versions: int = KEEP_VERSIONS
    ) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1 (the committed version), got {keep_versions}")
        self.chunk_size = chunk_size  # of the signed chunk lists; devices verify (and resume) at this granularity
        self.directory = Path(directory)
        self.metadata = self.directory / "metadata"
        self.targets_dir = self.directory / "targets"
        self.expiry = expiry or Expiry()
        self.keep_versions = keep_versions

    # -- reading ---------------------------------------------------------------

    def _load(self, name: str) -> Metadata[Any]:
        try:
            return Metadata.from_file(str(self.metadata / name))
        except Exception as exc:  # python-tuf raises several types for unreadable metadata
            raise ReleaseError(f"cannot read {name}: {exc}") from exc

    def root(self) -> Metadata[Root]:
        versions = metadata_versions(self.metadata, "root")
        if not versions:
            raise ReleaseError(f"{self.directory} is not an image repository (run `fleet repo init`)")
        return self._load(f"{versions[-1]}.root.json")

    def timestamp(self) -> Metadata[Timestamp]:
        return self._load("timestamp.json")

    def snapshot(self) -> Metadata[Snapshot]:
        return self._load(f"{self.timestamp().signed.snapshot_meta.version}.snapshot.json")

    def targets(self) -> Metadata[Targets]:
        return self._load(f"{self.snapshot().signed.meta['targets.json'].version}.targets.json")

    def releases(self) -> list[Release]:
        grouped: dict[tuple[str, str], list[tuple[int, ReleasedVariant]]] = {}
        for path, tf in self.targets().signed.targets.items():
            custom = tf.unrecognized_fields.get("custom", {})
            if path.endswith(CHUNKS_SUFFIX) or "variant" not in custom:
                continue
            v = ReleasedVariant(custom["variant"], path, tf.length, tf.hashes["sha256"], tuple(custom.get("hints", [])))
            grouped.setdefault((custom["model"], custom["version"]), []).append((int(custom.get("release_counter", 0)), v))
        out = [Release(m, ver, vs[0][0], tuple(sorted((v for _, v in vs), key=lambda v: v.id))) for (m, ver), vs in grouped.items()]
        return sorted(out, key=lambda r: (r.model, r.release_counter))

    def release_of(self, model: str, version: str) -> Release | None:
        return next((r for r in self.releases() if r.model == model and r.version == version), None)

    def revoked(self) -> list[dict[str, Any]]:
        """Every revoked release (model, version, release_counter, revoked_at, reason), as the signed targets record it."""
        records = self.targets().signed.unrecognized_fields.get(REVOKED_FIELD, [])
        return [dict(r) for r in records if isinstance(r, dict)]

    def revocation(self, model: str, version: str) -> dict[str, Any] | None:
        return next((r for r in self.revoked() if r.get("model") == model and r.get("version") == version), None)

    def ensure_not_revoked(self, model: str, version: str) -> None:
        """Raise ``ReleaseRevoked`` for a revoked release: the one clear error for assign, rollout and release."""
        record = self.revocation(model, version)
        if record is not None:
            why = f": {record['reason']}" if record.get("reason") else ""
            raise ReleaseRevoked(f"{model} {version} was revoked at {record.get('revoked_at', '?')}{why}; release a new version instead")

    # -- writing ---------------------------------------------------------------

    def _lock(self) -> Any:
        return repository_lock(self.directory)

    def _chain(self) -> SigningChain:
        """A key per role; snapshot and timestamp last as ``expiry`` says (read now: tests and tools may change it)."""
        return SigningChain(SIGNED_BY, self.expiry.root, self.expiry.snapshot, self.expiry.timestamp)

    def write_root(self, md: Metadata[Root]) -> None:
        """Add ``md`` as the next root (``{N}.root.json``; devices walk the chain from the root they were shipped with)."""
        atomic_write(self.metadata / f"{md.signed.version}.root.json", encode(md))

    @classmethod
    def create(cls, directory: str | Path, keys: KeyStore, expiry: Expiry | None = None) -> ImageRepository:
        repo = cls(directory, expiry)
        with repo._lock():
            if repo.metadata.exists() and any(repo.metadata.iterdir()):
                raise ReleaseError(f"{repo.directory} already holds a repository")
            repo.metadata.mkdir(parents=True, exist_ok=True)
            repo.targets_dir.mkdir(parents=True, exist_ok=True)
            repo.write_root(repo._chain().new_root(keys))
            repo._publish(Metadata(Targets(expires=signing_time() + repo.expiry.targets)), keys)
        return repo

    def _publish(self, targets_md: Metadata[Targets] | None, keys: KeyStore) -> None:
        """Sign targets (when given; else the committed targets stay), a snapshot naming it and a timestamp naming
        that, and commit the three together (``SigningChain.publish``)."""
        with self._lock():
            targets = targets_md if targets_md is not None else committed_versions(self.snapshot())["targets"]
            self._chain().publish(self.metadata, targets, keys, self.keep_versions, self.root().signed)

    def refresh(self, keys: KeyStore) -> None:
        """Re-sign snapshot and timestamp (online keys) so devices never see the repository as frozen.

        Run it well within the timestamp's lifetime (the controller's job); targets are
        signed offline and last ``Expiry.targets``: release again before that. It re-signs
        what is committed, never a targets file a crashed release left behind.
        """
        self._publish(None, keys)

    def prune(self) -> list[str]:
        """Delete all but the last ``keep_versions`` committed targets and snapshot versions (roots never: devices walk
        the whole chain from the root they were shipped with), and anything a crash left uncommitted."""
        with self._lock():
            return prune_metadata(self.metadata, committed_versions(self.snapshot()), self.keep_versions)

    def release(self, bundle: str | Path, keys: KeyStore) -> Release:
        """Add a bundle (directory or ``.tar.gz`` from ``fleet build --archive``): one signed target per variant."""
        with self._lock(), _bundle_dir(Path(bundle)) as (root, manifest):
            self.ensure_not_revoked(manifest.name, manifest.version)  # the same name for other bytes would confuse everyone
            targets_md = self.targets()
            prefix = f"{manifest.name}/{manifest.version}/"
            if any(p.startswith(prefix) for p in targets_md.signed.targets):
                raise ReleaseError(f"{manifest.name} {manifest.version} is already released")
            # counters never go back, revoked releases included: a device that ran a revoked release must accept the next
            counters = [r.release_counter for r in self.releases() if r.model == manifest.name]
            counters += [int(r.get("release_counter", 0)) for r in self.revoked() if r.get("model") == manifest.name]
            counter = 1 + max(counters, default=0)
            released = []
            for v in manifest.variants:
                data = _variant_archive(root, v)
                path = variant_target_path(manifest.name, manifest.version, v.id)
                tf = TargetFile.from_data(path, data, ["sha256"])
                tf.unrecognized_fields["custom"] = {
                    "model": manifest.name,
                    "version": manifest.version,
                    "release_counter": counter,
                    "variant": v.id,
                    "format": v.format,
                    "precision": v.precision,
                    "hints": list(v.hints),
                }
                chunks = ChunkManifest.of(data, self.chunk_size).encode()
                cf = TargetFile.from_data(path + CHUNKS_SUFFIX, chunks, ["sha256"])
                for target, content in ((tf, data), (cf, chunks)):
                    self._store(target, content)
                    targets_md.signed.targets[target.path] = target
                released.append(ReleasedVariant(v.id, path, len(data), tf.hashes["sha256"], tuple(v.hints)))
            targets_md.signed.expires = signing_time() + self.expiry.targets
            self._publish(targets_md, keys)
        return Release(manifest.name, manifest.version, counter, tuple(released))

    def revoke(self, model: str, version: str, keys: KeyStore, reason: str = "") -> Release:
        """Remove every target of ``model`` ``version`` from the signed targets (targets key, then snapshot and timestamp).

        Why this is enough: a device installs only what the image repository lists (and the director names),
        so from the commit on no device starts installing it, whatever a director (or a stolen director key)
        says. Devices that run it keep serving it — the image repository cannot reach into a device — and
        report each update round as ``REJECTED`` until the director names another version. The revocation is
        recorded in the signed targets (``x-edgefleet-revoked``) so the controller refuses to assign, roll out
        or re-release it with a clear error, and release counters never reuse its number. The stored
        artifacts are deleted after the commit (a download in flight then fails; nobody can fetch it again).
        """
        with self._lock():
            release = self.release_of(model, version)
            if release is None:
                self.ensure_not_revoked(model, version)
                raise ReleaseError(f"{model} {version} is not in the image repository")
            targets_md = self.targets()
            for v in release.variants:
                for path in (v.target_path, v.target_path + CHUNKS_SUFFIX):
                    targets_md.signed.targets.pop(path, None)
            records = list(targets_md.signed.unrecognized_fields.get(REVOKED_FIELD, []))
            records.append(
                {
                    "model": model,
                    "version": version,
                    "release_counter": release.release_counter,
                    "revoked_at": signing_time().isoformat().replace("+00:00", "Z"),
                    "reason": reason,
                }
            )
            targets_md.signed.unrecognized_fields[REVOKED_FIELD] = records
            targets_md.signed.expires = signing_time() + self.expiry.targets
            self._publish(targets_md, keys)
            stored = (self.targets_dir / model / version).resolve()
            if stored.is_relative_to(self.targets_dir.resolve()) and stored != self.targets_dir.resolve():
                shutil.rmtree(stored, ignore_errors=True)
        return release

    def _store(self, target: TargetFile, data: bytes) -> None:
        """Where ngclient looks for it with consistent snapshots: ``dir/{sha256}.{name}``."""
        directory, _, name = target.path.rpartition("/")
        stored = self.targets_dir / directory / f"{target.hashes['sha256']}.{name}"
        stored.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(stored, data)

    def publish(self, dest: str | Path) -> list[str]:
        """Copy the repository to ``dest``, a directory an HTTP server (nginx, a CDN's origin, an object store
        synced from it) serves as a mirror; the paths written, in the order written.

        The order is what keeps a client reading the mirror meanwhile safe: targets first, then the versioned
        metadata (roots, targets, snapshots), ``timestamp.json`` last — so no timestamp on the mirror ever names
        metadata or targets that are not there yet — and only then the files the repository no longer has (pruned
        versions, revoked artifacts). Each file is written under a temporary name and renamed (readers see the old
        file or the whole new one), readable by the web server (0644). A file already there with the same bytes is
        left alone, so publishing again copies only what changed. Under the repository's lock: no release or
        re-signing interleaves.
        """
        out = Path(dest)
        written: list[str] = []
        with self._lock():
            files = sorted(p.relative_to(self.directory).as_posix() for d in (self.targets_dir, self.metadata) for p in d.rglob("*"))
            files = [f for f in files if (self.directory / f).is_file() and not Path(f).name.startswith(".")]
            targets = [f for f in files if f.startswith("targets/")]
            roles = ("root", "targets", "snapshot")
            versioned = sorted(
                (f for f in files if f.startswith("metadata/") and f != "metadata/timestamp.json"), key=_metadata_order(roles)
            )
            for name in [*targets, *versioned, "metadata/timestamp.json"]:
                if _copy_changed(self.directory / name, out / name):
                    written.append(name)
            kept = set(files)
            for stale in sorted(p for d in ("targets", "metadata") for p in (out / d).rglob("*") if p.is_file()):
                if stale.relative_to(out).as_posix() not in kept:
                    stale.unlink()
        return written

    def rotate_root(
        self, keys: KeyStore, new_root_keys: int = 1, new_threshold: int = 1, director: HoldsRoot | None = None
    ) -> Metadata[Root]:
        """A new root with fresh root keys, signed by the old root keys (threshold) and the new ones.

        The new root is checked against both the old and the new root before anything
        is written; ``keys.json`` changes and the old private keys are deleted only after
        the repositories (this one and, when given, the director that shares the root
        keys) hold the new root (``metadata.rotate_root``).
        """
        with self._lock():
            repositories = [self] if director is None else [self, director]
            return rotate_root(keys, repositories, new_root_keys, new_threshold, self.expiry.root)[0]

    def rotate_key(self, keys: KeyStore, role: str, new_keys: int = 1, threshold: int = 1) -> Metadata[Root]:
        """New keys for ``role`` (targets, snapshot or timestamp): a new root naming them, signed by the root keys
        (bring them back online for this), the role's metadata re-signed with the new keys, the old keys retired
        (the order and why: ``SigningChain.rotate_key``).
        """
        if role not in IMAGE_ROLES:
            raise RotationError(f"the image repository's rotatable roles are {', '.join(IMAGE_ROLES)} (root: rotate_root), not {role!r}")

        def resign() -> None:
            if role == "targets":
                targets_md = self.targets()
                targets_md.signed.expires = signing_time() + self.expiry.targets
                self._publish(targets_md, keys)
            else:
                self.refresh(keys)

        with self._lock():
            return self._chain().rotate_key(keys, role, self.root(), new_keys, threshold, self.write_root, resign)


def _metadata_order(roles: tuple[str, ...]) -> Any:
    """Sort key for ``metadata/{N}.{role}.json``: roles in ``roles`` order, versions ascending."""

    def key(name: str) -> tuple[int, int, str]:
        version, _, role = Path(name).name.removesuffix(".json").partition(".")
        return (roles.index(role) if role in roles else len(roles), int(version) if version.isdigit() else 0, name)

    return key


def _copy_changed(src: Path, dst: Path) -> bool:
    """``src`` to ``dst`` by a temp file and a rename, unless ``dst`` holds the same bytes already; whether it wrote."""
    if dst.is_file() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        with os.fdopen(fd, "wb") as f, open(src, "rb") as r:
            shutil.copyfileobj(r, f, 1024 * 1024)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: a web server running as another user must read it
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


RELEASE_EXPANSION = 100  # a gzipped bundle archive may unpack to this many times its size (models compress ~2-10x)


@contextmanager
def _bundle_dir(path: Path) -> Iterator[tuple[Path, Bundle]]:
    """The bundle as a verified directory (an archive is unpacked to a temp dir); a bad bundle is a ``ReleaseError``."""
    try:
        with tempfile.TemporaryDirectory() as d:
            if path.is_dir():
                root = path
            else:
                with tarfile.open(path, mode="r:*") as tar:  # gzip allowed here: the bound allows its expansion
                    safe_tar.extract(tar, d, bound=RELEASE_EXPANSION * path.stat().st_size + 2**20)
                root = Path(d)
            manifest = load_bundle(root)
            verify_files(manifest, root)
            yield root, manifest
    except (BundleError, UnsafeArchive, OSError, tarfile.TarError, ValueError) as exc:
        raise ReleaseError(f"{path} is not a valid bundle: {exc}") from exc


def _variant_archive(root: Path, v: Variant) -> bytes:
    """A deterministic tar (no compression: model weights barely compress) of what a device needs for ``v``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted({BUNDLE_FILE, v.file, v.golden, *v.extra_files}):
            info = tar.gettarinfo(str(root / name), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with open(root / name, "rb") as f:
                tar.addfile(info, f)
    return buf.getvalue()
