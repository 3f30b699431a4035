"""The director repository: what each device must run, signed online (Uptane's second repository).

One TUF repository per device under ``DIR/{device}/metadata``; they share one root
(signed by the offline root keys once, at ``Director.create``) that gives the
online ``director`` key the targets, snapshot and timestamp roles. A device's
targets name exactly one bundle to run (by the image repository's path, length and
hashes) and the variant it should install, and at most one more marked as a shadow
(shadow mode); the agent installs only what both repositories agree on.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from agent.errors import EdgefleetError
from agent.files import atomic_write
from agent.wire import valid_device_id
from fleet.image_repo import ImageRepository, sign_metadata, variant_target_path
from fleet.keys import KeyStore

__all__ = ["AssignError", "Director"]

ROOT_FILE = "1.root.json"


class AssignError(EdgefleetError):
    code = "bad_assignment"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class Director:
    def __init__(
        self, directory: str | Path, targets_expiry: timedelta = timedelta(days=7), timestamp_expiry: timedelta = timedelta(days=1)
    ) -> None:
        self.directory = Path(directory)
        self.targets_expiry = targets_expiry
        self.timestamp_expiry = timestamp_expiry

    @classmethod
    def create(cls, directory: str | Path, keys: KeyStore, root_expiry: timedelta = timedelta(days=365)) -> Director:
        d = cls(directory)
        if (d.directory / ROOT_FILE).exists():
            raise AssignError(f"{d.directory} already holds a director")
        d.directory.mkdir(parents=True, exist_ok=True)
        root = Root(expires=_now() + root_expiry, consistent_snapshot=True)
        for key in keys.public_keys("root"):
            root.add_key(key, "root")
        root.roles["root"].threshold = keys.threshold("root")
        for role in ("targets", "snapshot", "timestamp"):
            for key in keys.public_keys("director"):
                root.add_key(key, role)
            root.roles[role].threshold = keys.threshold("director")
        md = Metadata(root)
        sign_metadata(md, keys.signers("root"))
        atomic_write(d.directory / ROOT_FILE, md.to_bytes(JSONSerializer(compact=False)))
        return d

    def root(self) -> Metadata[Root]:
        versions = sorted(int(p.name.split(".")[0]) for p in self.directory.glob("*.root.json"))
        return Metadata.from_file(str(self.directory / f"{versions[-1]}.root.json"))

    def write_root(self, md: Metadata[Root]) -> None:
        """A new root for every device: each device repository gets a copy (devices walk the root chain)."""
        data = md.to_bytes(JSONSerializer(compact=False))
        name = f"{md.signed.version}.root.json"
        atomic_write(self.directory / name, data)
        for meta in self.directory.glob("*/metadata"):
            atomic_write(meta / name, data)

    def devices(self) -> list[str]:
        return sorted(p.parent.name for p in self.directory.glob("*/metadata"))

    def refresh(self, keys: KeyStore, devices: list[str] | None = None) -> None:
        """Re-sign each device's targets, snapshot and timestamp (all online) before they expire."""
        for device in devices or self.devices():
            meta = self.device_metadata(device)
            version = self._current_version(meta, "targets")
            if not version:
                continue
            md: Metadata[Targets] = Metadata.from_file(str(meta / f"{version}.targets.json"))
            md.signed.version += 1
            md.signed.expires = _now() + self.targets_expiry
            self._publish(meta, md, keys)

    def device_metadata(self, device: str) -> Path:
        return self.directory / valid_device_id(device) / "metadata"

    def assign(
        self,
        device: str,
        image: ImageRepository,
        model: str,
        version: str,
        variant: str,
        keys: KeyStore,
        shadow: tuple[str, str] | None = None,
    ) -> TargetFile:
        """Point ``device`` at ``model`` ``version`` (variant ``variant``), as the image repository lists it.

        ``shadow`` = (version, variant) also names a second version of the model for the device to run beside
        it on live inputs, answering nobody (shadow mode); assigning without it ends a shadow.
        """
        target = self._target(image, model, version, variant)
        targets = {target.path: target}
        if shadow is not None:
            candidate = self._target(image, model, *shadow)
            if candidate.path == target.path:
                raise AssignError(f"{model} {version} cannot shadow itself")
            candidate.unrecognized_fields["custom"]["shadow"] = True
            targets[candidate.path] = candidate
        meta = self.device_metadata(device)
        meta.mkdir(parents=True, exist_ok=True)
        for root in self.directory.glob("*.root.json"):  # the whole root chain, so a new device can walk it
            if not (meta / root.name).exists():
                shutil.copy(root, meta / root.name)
        version_now = self._current_version(meta, "targets")
        self._publish(meta, Metadata(Targets(version=version_now + 1, expires=_now() + self.targets_expiry, targets=targets)), keys)
        return target

    @staticmethod
    def _target(image: ImageRepository, model: str, version: str, variant: str) -> TargetFile:
        path = variant_target_path(model, version, variant)
        released = image.targets().signed.targets.get(path)
        if released is None:
            if image.release_of(model, version) is None:
                raise AssignError(f"{model} {version} is not in the image repository")
            raise AssignError(f"{model} {version} has no variant {variant!r}")
        custom = released.unrecognized_fields.get("custom", {})
        target = TargetFile(released.length, dict(released.hashes), path)
        target.unrecognized_fields["custom"] = {
            "model": model,
            "version": version,
            "variant": variant,
            "release_counter": custom.get("release_counter", 0),
        }
        return target

    @staticmethod
    def _current_version(meta: Path, role: str) -> int:
        versions = [int(p.name.split(".")[0]) for p in meta.glob(f"*.{role}.json")]
        return max(versions, default=0)

    def _publish(self, meta: Path, targets_md: Metadata[Targets], keys: KeyStore) -> None:
        signers = keys.signers("director")
        sign_metadata(targets_md, signers)
        atomic_write(meta / f"{targets_md.signed.version}.targets.json", targets_md.to_bytes(JSONSerializer(compact=False)))
        snap = Metadata(
            Snapshot(
                version=self._current_version(meta, "snapshot") + 1,
                expires=_now() + self.targets_expiry,
                meta={"targets.json": MetaFile(version=targets_md.signed.version)},
            )
        )
        sign_metadata(snap, signers)
        atomic_write(meta / f"{snap.signed.version}.snapshot.json", snap.to_bytes(JSONSerializer(compact=False)))
        self._timestamp(meta, snap.signed.version, keys)

    def _timestamp(self, meta: Path, snapshot_version: int, keys: KeyStore) -> None:
        current = meta / "timestamp.json"
        version = Metadata.from_file(str(current)).signed.version + 1 if current.exists() else 1
        ts = Metadata(Timestamp(version=version, expires=_now() + self.timestamp_expiry, snapshot_meta=MetaFile(version=snapshot_version)))
        sign_metadata(ts, keys.signers("director"))
        atomic_write(meta / "timestamp.json", ts.to_bytes(JSONSerializer(compact=False)))
