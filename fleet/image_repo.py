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
import io
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from agent.bundle import BUNDLE_FILE, Bundle, BundleError, Variant, load_bundle, verify_files
from agent.chunks import CHUNK_SIZE, CHUNKS_SUFFIX, ChunkManifest
from agent.errors import EdgefleetError
from agent.files import atomic_write
from fleet.keys import KeyStore

if TYPE_CHECKING:
    from fleet.director import Director

__all__ = ["Expiry", "ImageRepository", "Release", "ReleaseError", "ReleasedVariant", "variant_target_path"]


class ReleaseError(EdgefleetError):
    """A release that cannot be added; the repository is unchanged."""

    code = "bad_release"


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
    def __init__(self, directory: str | Path, expiry: Expiry | None = None, chunk_size: int = CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size  # of the signed chunk lists; devices verify (and resume) at this granularity
        self.directory = Path(directory)
        self.metadata = self.directory / "metadata"
        self.targets_dir = self.directory / "targets"
        self.expiry = expiry or Expiry()

    # -- reading ---------------------------------------------------------------

    def _load(self, name: str) -> Metadata[Any]:
        try:
            return Metadata.from_file(str(self.metadata / name))
        except Exception as exc:  # python-tuf raises several types for unreadable metadata
            raise ReleaseError(f"cannot read {name}: {exc}") from exc

    def root(self) -> Metadata[Root]:
        versions = sorted(int(p.name.split(".")[0]) for p in self.metadata.glob("*.root.json"))
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

    # -- writing ---------------------------------------------------------------

    def _write(self, md: Metadata[Any], name: str) -> None:
        atomic_write(self.metadata / name, md.to_bytes(JSONSerializer(compact=False)))

    @staticmethod
    def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
        sign_metadata(md, signers)

    @classmethod
    def create(cls, directory: str | Path, keys: KeyStore, expiry: Expiry | None = None) -> ImageRepository:
        repo = cls(directory, expiry)
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

    def _publish(self, targets_md: Metadata[Targets], keys: KeyStore) -> None:
        """Sign and write targets, then a snapshot naming it, then a timestamp naming that."""
        now = _now()
        self._sign(targets_md, keys.signers("targets"))
        self._write(targets_md, f"{targets_md.signed.version}.targets.json")
        try:
            old_snapshot_version = self.snapshot().signed.version
        except ReleaseError:
            old_snapshot_version = 0
        snapshot_md = Metadata(
            Snapshot(
                version=old_snapshot_version + 1,
                expires=now + self.expiry.snapshot,
                meta={"targets.json": MetaFile(version=targets_md.signed.version)},
            )
        )
        self._sign(snapshot_md, keys.signers("snapshot"))
        self._write(snapshot_md, f"{snapshot_md.signed.version}.snapshot.json")
        self._write_timestamp(snapshot_md.signed.version, keys)

    def _write_timestamp(self, snapshot_version: int, keys: KeyStore) -> None:
        try:
            version = self.timestamp().signed.version + 1
        except ReleaseError:
            version = 1
        ts = Metadata(Timestamp(version=version, expires=_now() + self.expiry.timestamp, snapshot_meta=MetaFile(version=snapshot_version)))
        self._sign(ts, keys.signers("timestamp"))
        self._write(ts, "timestamp.json")

    def refresh(self, keys: KeyStore) -> None:
        """Re-sign snapshot and timestamp (online keys) so devices never see the repository as frozen.

        Run it well within the timestamp's lifetime (the controller's job); targets are
        signed offline and last ``Expiry.targets``: release again before that.
        """
        snapshot = self.snapshot()
        snapshot.signed.version += 1
        snapshot.signed.expires = _now() + self.expiry.snapshot
        self._sign(snapshot, keys.signers("snapshot"))
        self._write(snapshot, f"{snapshot.signed.version}.snapshot.json")
        self._write_timestamp(snapshot.signed.version, keys)

    def release(self, bundle: str | Path, keys: KeyStore) -> Release:
        """Add a bundle (directory or ``.tar.gz`` from ``fleet build --archive``): one signed target per variant."""
        with _bundle_dir(Path(bundle)) as (root, manifest):
            targets_md = self.targets()
            prefix = f"{manifest.name}/{manifest.version}/"
            if any(p.startswith(prefix) for p in targets_md.signed.targets):
                raise ReleaseError(f"{manifest.name} {manifest.version} is already released")
            counter = 1 + max((r.release_counter for r in self.releases() if r.model == manifest.name), default=0)
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
        targets_md.signed.version += 1
        targets_md.signed.expires = _now() + self.expiry.targets
        self._publish(targets_md, keys)
        return Release(manifest.name, manifest.version, counter, tuple(released))

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


def rotated_root(current: Metadata[Root], old: Sequence[Signer], new: Sequence[Any], threshold: int, lifetime: timedelta) -> Metadata[Root]:
    """The next root version trusting ``new`` keys; raises ``ReleaseError`` unless old and new roots both accept it."""
    root = Root.from_dict(copy.deepcopy(current.signed.to_dict()))  # to_dict shares lists with `current`
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    for s in new:
        root.add_key(s.public_key, "root")
    root.roles["root"].threshold = threshold
    root.version += 1
    root.expires = _now() + lifetime
    md = Metadata(root)
    sign_metadata(md, [*old, *new])
    try:
        current.verify_delegate("root", md)  # enough old keys signed
        md.verify_delegate("root", md)  # enough new keys signed
    except Exception as exc:  # python-tuf's UnsignedMetadataError and friends
        raise ReleaseError(f"root rotation would not verify ({exc}); bring back enough old root keys") from exc
    return md


def sign_metadata(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    """Replace every signature with one from each signer (threshold signing)."""
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)


@contextmanager
def _bundle_dir(path: Path) -> Iterator[tuple[Path, Bundle]]:
    """The bundle as a verified directory (an archive is unpacked to a temp dir); a bad bundle is a ``ReleaseError``."""
    try:
        with tempfile.TemporaryDirectory() as d:
            if path.is_dir():
                root = path
            else:
                with tarfile.open(path, mode="r:*") as tar:
                    tar.extractall(d, filter="data")
                root = Path(d)
            manifest = load_bundle(root)
            verify_files(manifest, root)
            yield root, manifest
    except (BundleError, OSError, tarfile.TarError, ValueError) as exc:
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
