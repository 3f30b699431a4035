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
Trust state changes in exactly one place: ``ImageRepository`` writes and signs.
"""

from __future__ import annotations

import copy
import fcntl
import io
import os
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from agent.bundle import BUNDLE_FILE, Bundle, BundleError, Variant, load_bundle, verify_files
from agent.chunks import CHUNK_SIZE, CHUNKS_SUFFIX, ChunkManifest
from agent.errors import EdgefleetError, UnsafeArchive
from agent.files import atomic_write
from agent.update import safe_tar
from agent.update.verify import REVOKED_FIELD
from fleet.tuf.keys import KeyStore

if TYPE_CHECKING:
    from fleet.tuf.director import Director

__all__ = [
    "IMAGE_ROLES",
    "KEEP_VERSIONS",
    "Expiry",
    "ImageRepository",
    "Release",
    "ReleaseError",
    "ReleaseRevoked",
    "ReleasedVariant",
    "RotationError",
    "commit_metadata",
    "metadata_versions",
    "prune_metadata",
    "repository_lock",
    "root_with_keys",
    "variant_target_path",
]

IMAGE_ROLES = ("targets", "snapshot", "timestamp")  # rotatable by `rotate_key`; root has `rotate_root`
KEEP_VERSIONS = 3  # targets/snapshot versions kept per repository: a device mid-refresh still finds the one it was told
LOCK_FILE = ".lock"


class ReleaseError(EdgefleetError):
    """A release that cannot be added; the repository is unchanged."""

    code = "bad_release"


class ReleaseRevoked(EdgefleetError):
    """The release was revoked: it can be neither assigned, rolled out nor released again under that version."""

    code = "revoked"


class RotationError(ReleaseError):
    """A key rotation that cannot be done (unknown role, too few keys for the threshold, root keys missing);
    nothing was written."""

    code = "bad_rotation"


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


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


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

    def _write(self, md: Metadata[Any], name: str) -> None:
        atomic_write(self.metadata / name, md.to_bytes(JSONSerializer(compact=False)))

    @staticmethod
    def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
        sign_metadata(md, signers)

    @classmethod
    def create(cls, directory: str | Path, keys: KeyStore, expiry: Expiry | None = None) -> ImageRepository:
        repo = cls(directory, expiry)
        with repo._lock():
            if repo.metadata.exists() and any(repo.metadata.iterdir()):
                raise ReleaseError(f"{repo.directory} already holds a repository")
            repo.metadata.mkdir(parents=True, exist_ok=True)
            repo.targets_dir.mkdir(parents=True, exist_ok=True)
            now = _now()
            root = Root(expires=now + repo.expiry.root, consistent_snapshot=True)
            for role in ("root", "targets", "snapshot", "timestamp"):
                for key in keys.public_keys(role):
                    root.add_key(key, role)
                root.roles[role].threshold = keys.threshold(role)
            root_md = Metadata(root)
            repo._sign(root_md, keys.signers("root"))
            repo._write(root_md, "1.root.json")
            targets_md = Metadata(Targets(expires=now + repo.expiry.targets))
            repo._publish(targets_md, keys)
        return repo

    def _publish(self, targets_md: Metadata[Targets] | None, keys: KeyStore) -> None:
        """Sign targets (when given), a snapshot naming it and a timestamp naming that, and commit the three together.

        Versions go above every file on disk (an uncommitted one a crash left behind included), so a numbered
        file, once a device may have fetched it, is never rewritten with other content (mirrors cache them).
        """
        with self._lock():
            now = _now()
            files: list[tuple[str, bytes]] = []
            if targets_md is not None:
                targets_md.signed.version = max(metadata_versions(self.metadata, "targets"), default=0) + 1
                self._sign(targets_md, keys.signers("targets"))
                files.append((f"{targets_md.signed.version}.targets.json", _bytes(targets_md)))
                targets_version = targets_md.signed.version
            else:
                targets_version = self.snapshot().signed.meta["targets.json"].version
            snapshot_md = Metadata(
                Snapshot(
                    version=max(metadata_versions(self.metadata, "snapshot"), default=0) + 1,
                    expires=now + self.expiry.snapshot,
                    meta={"targets.json": MetaFile(version=targets_version)},
                )
            )
            self._sign(snapshot_md, keys.signers("snapshot"))
            files.append((f"{snapshot_md.signed.version}.snapshot.json", _bytes(snapshot_md)))
            try:
                ts_version = self.timestamp().signed.version + 1
            except ReleaseError:
                ts_version = 1
            ts = Metadata(
                Timestamp(
                    version=ts_version, expires=now + self.expiry.timestamp, snapshot_meta=MetaFile(version=snapshot_md.signed.version)
                )
            )
            self._sign(ts, keys.signers("timestamp"))
            files.append(("timestamp.json", _bytes(ts)))
            commit_metadata(self.metadata, files)
            self.prune()

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
            snapshot = self.snapshot()
            committed = {"snapshot": snapshot.signed.version, "targets": snapshot.signed.meta["targets.json"].version}
            return prune_metadata(self.metadata, committed, self.keep_versions)

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
            targets_md.signed.expires = _now() + self.expiry.targets
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
                    "revoked_at": _now().isoformat().replace("+00:00", "Z"),
                    "reason": reason,
                }
            )
            targets_md.signed.unrecognized_fields[REVOKED_FIELD] = records
            targets_md.signed.expires = _now() + self.expiry.targets
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

    def rotate_root(
        self, keys: KeyStore, new_root_keys: int = 1, new_threshold: int = 1, director: Director | None = None
    ) -> Metadata[Root]:
        """A new root with fresh root keys, signed by the old root keys (threshold) and the new ones.

        The new root is checked against both the old and the new root before anything
        is written; ``keys.json`` changes and the old private keys are deleted only after
        the repositories (this one and, when given, the director that shares the root
        keys) hold the new root.
        """
        with self._lock():
            old_signers = keys.signers("root")
            new_signers = keys.generate("root", new_root_keys)
            try:
                md = rotated_root(self.root(), old_signers, new_signers, new_threshold, self.expiry.root)
                director_md = rotated_root(director.root(), old_signers, new_signers, new_threshold, self.expiry.root) if director else None
            except Exception:
                keys.forget("root", new_signers)
                raise
            self._write(md, f"{md.signed.version}.root.json")
            if director is not None and director_md is not None:
                director.write_root(director_md)
            keys.set_role("root", new_signers, new_threshold)
            keys.forget("root", old_signers)
        return md

    def rotate_key(self, keys: KeyStore, role: str, new_keys: int = 1, threshold: int = 1) -> Metadata[Root]:
        """New keys for ``role`` (targets, snapshot or timestamp): a new root naming them, signed by the root keys
        (bring them back online for this), the role's metadata re-signed with the new keys, the old keys retired.

        Why in this order: devices learn keys only from the root, so the root goes first; ``keys.json`` follows
        and the metadata is re-signed with the new keys while the repository is locked, so no other writer
        signs in between. A device that refreshes between the two sees the new root and metadata signed by the
        old key and refuses it (it retries; it never accepts what the new root does not allow). The old private
        keys are deleted last — they need not be present at all: rotating away a lost or stolen key works.
        Re-running after a crash rotates again, retiring the keys of the interrupted attempt too.
        """
        if role not in IMAGE_ROLES:
            raise RotationError(f"the image repository's rotatable roles are {', '.join(IMAGE_ROLES)} (root: rotate_root), not {role!r}")
        root_signers = keys.signers("root")
        with self._lock():
            current = self.root()
            old_keyids = set(current.signed.roles[role].keyids) | {k.keyid for k in keys.public_keys(role)}
            new_signers = keys.generate(role, new_keys)
            try:
                md = root_with_keys(current, [role], new_signers, threshold, root_signers, self.expiry.root)
            except Exception:
                keys.forget(role, new_signers)
                raise
            self._write(md, f"{md.signed.version}.root.json")
            keys.set_role(role, new_signers, threshold)
            if role == "targets":
                targets_md = self.targets()
                targets_md.signed.expires = _now() + self.expiry.targets
                self._publish(targets_md, keys)
            else:
                self.refresh(keys)
            keys.retire(role, old_keyids - {s.public_key.keyid for s in new_signers})
        return md


def _bytes(md: Metadata[Any]) -> bytes:
    return md.to_bytes(JSONSerializer(compact=False))


def metadata_versions(directory: Path, role: str) -> list[int]:
    """The version numbers of ``{N}.{role}.json`` files in ``directory``, ascending (temp files never match)."""
    out = []
    for p in directory.glob(f"*.{role}.json"):
        head = p.name.split(".", 1)[0]
        if head.isdigit():
            out.append(int(head))
    return sorted(out)


def commit_metadata(directory: Path, files: Sequence[tuple[str, bytes]]) -> None:
    """Write every file under a temporary name (fsynced), then rename them in the given order; the last rename commits.

    Why: readers follow ``timestamp.json`` → ``N.snapshot.json`` → ``N.targets.json``, so with the timestamp
    last a crash at any point leaves either the old complete set or the new one; numbered files renamed
    before a crash are versions nothing names (``prune_metadata`` removes them, and new versions go above them).
    """
    staged: list[tuple[str, str]] = []
    try:
        for name, data in files:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
            staged.append((tmp, name))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, name in staged:
            os.replace(tmp, directory / name)
        _fsync_dir(directory)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make the renames themselves durable (a power cut after a rename must not bring the old name back)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_metadata(directory: Path, committed: dict[str, int], keep: int) -> list[str]:
    """Delete, per role in ``committed`` (targets, snapshot), every version but the ``keep`` newest up to the committed
    one, every version above it (a crash's leftovers) and stale temp files; the names deleted. Call it holding the
    repository's lock: a version above the committed one is then never a writer's work in progress."""
    removed = []
    for role, current in committed.items():
        versions = metadata_versions(directory, role)
        kept = set([v for v in versions if v <= current][-keep:])
        for v in versions:
            if v not in kept:
                (directory / f"{v}.{role}.json").unlink(missing_ok=True)
                removed.append(f"{v}.{role}.json")
    for tmp in directory.glob(".*.json.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed


@dataclass
class _Held:
    lock: threading.RLock = field(default_factory=threading.RLock)
    depth: int = 0
    fd: int = -1


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


@contextmanager
def repository_lock(directory: str | Path) -> Iterator[None]:
    """Exclusive use of a repository: across processes (``flock`` on ``DIR/.lock``) and threads, re-entrant in one thread.

    Why: ``fleet serve`` re-signs online metadata on its own schedule while ``fleet assign``, ``release`` or
    ``keys rotate`` run as other processes; two writers would pick the same version numbers, and a rotation
    must not interleave with a re-signing by the retired key. The lock dies with its process (``kill -9``
    included), so a crash never leaves it held.
    """
    key = str(Path(directory).resolve())
    with _held_guard:
        held = _held.setdefault(key, _Held())
    with held.lock:
        if held.depth == 0:
            os.makedirs(key, exist_ok=True)
            fd = os.open(os.path.join(key, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            held.fd = fd
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                os.close(held.fd)  # releases the flock
                held.fd = -1


def root_with_keys(
    current: Metadata[Root],
    roles: Iterable[str],
    new: Sequence[Any],
    threshold: int,
    signers: Sequence[Signer],
    lifetime: timedelta,
    advice: str = "bring back enough root keys",
) -> Metadata[Root]:
    """The next root version in which each of ``roles`` trusts exactly the ``new`` keys (``threshold`` of them), signed
    by ``signers``; raises ``RotationError`` unless both the current root and the new one accept it."""
    if not 1 <= threshold <= len(new):
        raise RotationError(f"threshold {threshold} needs at least that many new keys (got {len(new)})")
    root = Root.from_dict(copy.deepcopy(current.signed.to_dict()))  # to_dict shares lists with `current`
    for role in roles:
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        for s in new:
            root.add_key(s.public_key, role)
        root.roles[role].threshold = threshold
    root.version += 1
    root.expires = _now() + lifetime
    md = Metadata(root)
    sign_metadata(md, signers)
    try:
        current.verify_delegate("root", md)  # enough keys the devices trust now signed
        md.verify_delegate("root", md)  # enough keys of the new root signed
    except Exception as exc:  # python-tuf's UnsignedMetadataError and friends
        raise RotationError(f"root rotation would not verify ({exc}); {advice}") from exc
    return md


def rotated_root(current: Metadata[Root], old: Sequence[Signer], new: Sequence[Any], threshold: int, lifetime: timedelta) -> Metadata[Root]:
    """The next root version trusting ``new`` root keys; raises ``RotationError`` unless old and new roots both accept it."""
    return root_with_keys(current, ["root"], new, threshold, [*old, *new], lifetime, "bring back enough old root keys")


def sign_metadata(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    """Replace every signature with one from each signer (threshold signing)."""
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)


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
