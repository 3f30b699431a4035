"""The director repository: what each device must run, signed online (Uptane's second repository).

One TUF repository per device under ``DIR/{device}/metadata``; they share one root
(signed by the offline root keys once, at ``Director.create``) that gives the
online ``director`` key the targets, snapshot and timestamp roles. A device's
targets name exactly one bundle to run (by the image repository's path, length and
hashes) and the variant it should install, and at most one more marked as a shadow
(shadow mode); the agent installs only what both repositories agree on.

An assignment is committed when the device's ``timestamp.json`` names it: targets,
snapshot and timestamp are written under temporary names and renamed in that order
(``commit_metadata``), so a ``fleet assign`` killed at any point leaves the old
assignment or the new one, and ``refresh`` re-signs only what the timestamp names.
Mirrors: ``fleet director init --mirror URL`` (or ``fleet director mirrors URL…``) keeps a list of HTTP(S) mirrors
of the image repository in ``DIR/mirrors.json``; every device's targets carry it, signed, in ``x-edgefleet-mirrors``
and the agent fetches the image repository from them before its MQTT repository. Why that is safe: a mirror only
says where to look — every byte from it is verified (TUF metadata against the image root, artifacts chunk by chunk);
why signed anyway: so that nobody on the broker can point the fleet's downloads elsewhere, even to waste them.
The signing chain (root creation, sign → snapshot → timestamp, pruning, key rotation) is the one the image
repository uses (``fleet.tuf.metadata``); only who signs (``SIGNED_BY``) and the lifetimes differ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp

from agent.errors import EdgefleetError
from agent.files import atomic_write
from agent.update.mirrors import MAX_MIRRORS, valid_mirrors
from agent.update.verify import MIRRORS_FIELD
from agent.wire import valid_device_id
from fleet.tuf import director_store
from fleet.tuf.director_store import DirectorStore, Synced
from fleet.tuf.image_repo import ImageRepository, variant_target_path
from fleet.tuf.keys import KeyStore
from fleet.tuf.metadata import (
    KEEP_VERSIONS,
    SigningChain,
    commit_batch,
    committed_versions,
    encode,
    metadata_versions,
    prune_metadata,
    repository_lock,
    signers_of,
    signing_time,
    timestamp_version,
)

__all__ = ["DIRECTOR_ROLES", "AssignError", "Assignment", "Director"]

ROOT_FILE = "1.root.json"
MIRRORS_FILE = "mirrors.json"
DIRECTOR_ROLES = ("targets", "snapshot", "timestamp")  # all three signed by the one online "director" key
SIGNED_BY = {"root": "root", **{role: "director" for role in DIRECTOR_ROLES}}  # the key role per TUF role


class AssignError(EdgefleetError):
    code = "bad_assignment"


class Director:
    """Trust state of the director changes here and nowhere else: one writer at a time (``repository_lock``), every
    device's metadata published through the shared signing chain, so a device sees its old assignment or its new
    one and never a half-written one."""

    def __init__(
        self,
        directory: str | Path,
        targets_expiry: timedelta = timedelta(days=7),
        timestamp_expiry: timedelta = timedelta(days=1),
        keep_versions: int = KEEP_VERSIONS,
        root_expiry: timedelta = timedelta(days=365),
        store: DirectorStore | None = None,
    ) -> None:
        """``store``: every commit is also written there, and a device's newer copy there is taken before signing it
        (several controllers: ``fleet.tuf.director_store``); None: the files alone (one box)."""
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1 (the committed version), got {keep_versions}")
        self.directory = Path(directory)
        self.targets_expiry = targets_expiry
        self.timestamp_expiry = timestamp_expiry
        self.keep_versions = keep_versions
        self.root_expiry = root_expiry
        self.store = store

    def _lock(self) -> Any:
        """One writer at a time across processes (``fleet serve``'s re-signing, ``fleet assign``, a key rotation)."""
        return repository_lock(self.directory)

    def _chain(self) -> SigningChain:
        """The director key signs all three roles; the snapshot lasts as long as the targets (read now: tests change them)."""
        return SigningChain(SIGNED_BY, self.root_expiry, self.targets_expiry, self.timestamp_expiry)

    @classmethod
    def create(cls, directory: str | Path, keys: KeyStore, root_expiry: timedelta = timedelta(days=365)) -> Director:
        d = cls(directory, root_expiry=root_expiry)
        with d._lock():
            if (d.directory / ROOT_FILE).exists():
                raise AssignError(f"{d.directory} already holds a director")
            d.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(d.directory / ROOT_FILE, encode(d._chain().new_root(keys)))
        return d

    def mirrors(self) -> list[str]:
        """The image repository's HTTP(S) mirrors every device is told about, in order."""
        path = self.directory / MIRRORS_FILE
        return valid_mirrors(json.loads(path.read_text())) if path.is_file() else []

    def set_mirrors(self, urls: list[str], keys: KeyStore) -> list[str]:
        """Tell every device about ``urls`` (http or https; the others are an ``AssignError``): kept for the next
        assignments and every committed one re-signed with them now."""
        mirrors = valid_mirrors(urls)
        if any(not valid_mirrors([u]) for u in urls) or len(urls) > MAX_MIRRORS:
            raise AssignError(f"mirrors must be at most {MAX_MIRRORS} distinct http:// or https:// URLs, got {urls}")
        with self._lock():
            atomic_write(self.directory / MIRRORS_FILE, json.dumps(mirrors).encode())
            if self.store is not None:
                director_store.push_director(self.store, self.directory)
            self.refresh(keys)
        return mirrors

    def root(self) -> Metadata[Root]:
        versions = metadata_versions(self.directory, "root")
        return Metadata.from_file(str(self.directory / f"{versions[-1]}.root.json"))

    def write_root(self, md: Metadata[Root]) -> None:
        """A new root for every device: each device repository gets a copy (devices walk the root chain)."""
        data = encode(md)
        name = f"{md.signed.version}.root.json"
        with self._lock():
            atomic_write(self.directory / name, data)
            for meta in self.directory.glob("*/metadata"):
                atomic_write(meta / name, data)
            if self.store is not None:
                director_store.push_director(self.store, self.directory)
                for meta in self.directory.glob("*/metadata"):
                    director_store.push_device(self.store, meta, meta.parent.name)

    def devices(self) -> list[str]:
        return sorted(p.parent.name for p in self.directory.glob("*/metadata"))

    def refresh(self, keys: KeyStore, devices: list[str] | None = None) -> None:
        """Re-sign each device's committed targets, snapshot and timestamp (all online) before they expire.

        Only the committed assignment (the one ``timestamp.json`` names) is re-signed: a targets file an
        interrupted ``assign`` left behind is never published by a routine refresh.
        """
        with self._lock():
            for device in devices or self.devices():
                meta = self.device_metadata(device)
                self._pull(meta, device)  # re-sign what the store has if it is newer: never an older assignment
                md = self.committed_targets(meta)
                if md is None:
                    continue
                md.signed.expires = signing_time() + self.targets_expiry
                self._publish(meta, md, keys)

    def _pull(self, meta: Path, device: str) -> None:
        if self.store is not None:
            director_store.pull_device(self.store, meta, device)

    def sync(self) -> Synced:
        """Level the files and the store (the newer copy of each device wins); a controller runs it when it starts to
        lead and every re-signing round. Without a store: nothing."""
        if self.store is None:
            return Synced(0, 0)
        with self._lock():
            return director_store.sync(self.store, self.directory, self.devices())

    def device_metadata(self, device: str) -> Path:
        return self.directory / valid_device_id(device) / "metadata"

    def committed_targets(self, meta: Path) -> Metadata[Targets] | None:
        """The targets the device's timestamp leads to (through its snapshot): what the device is told; None before
        its first assignment."""
        ts_path = meta / "timestamp.json"
        if not ts_path.is_file():
            return None
        ts: Metadata[Timestamp] = Metadata.from_file(str(ts_path))
        snap: Metadata[Snapshot] = Metadata.from_file(str(meta / f"{ts.signed.snapshot_meta.version}.snapshot.json"))
        return Metadata.from_file(str(meta / f"{snap.signed.meta['targets.json'].version}.targets.json"))

    def assigned(self, model: str, version: str) -> list[str]:
        """Devices whose committed assignment names ``model`` ``version`` (to run or as a shadow)."""
        out = []
        for device in self.devices():
            md = self.committed_targets(self.device_metadata(device))
            for tf in md.signed.targets.values() if md is not None else ():
                custom = tf.unrecognized_fields.get("custom", {})
                if (custom.get("model"), custom.get("version")) == (model, version):
                    out.append(device)
                    break
        return out

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
        A revoked release is refused (``ReleaseRevoked``). One device of ``assign_many``.
        """
        result = self.assign_many([Assignment(device, model, version, variant, shadow)], image, keys)[device]
        if isinstance(result, Exception):
            raise result
        return result

    def assign_many(self, assignments: Sequence[Assignment], image: ImageRepository, keys: KeyStore) -> dict[str, TargetFile | Exception]:
        """``assign`` for many devices at once: per device, the target it now runs, or why it could not be assigned
        (a bad device id, a release that is not there; the others go on).

        Why a batch: what is the same for every device (the image repository's targets, the director's roots and
        mirrors, the key) is read once, the files of every device are made durable with three filesystem syncs in
        all (``commit_batch``: each device's timestamp renamed only after the files it names are durable) instead of
        four fsyncs per device, and the store gets every device's set in one transaction. A device sees its old
        assignment or its new one, as with ``assign``; a failure while committing fails the whole batch."""
        results: dict[str, TargetFile | Exception] = {}
        planned: list[tuple[str, Path, dict[str, TargetFile]]] = []
        released = _Released(image)
        for a in assignments:
            try:
                if a.device in results:
                    raise AssignError(f"{a.device} is assigned twice in one batch")
                meta = self.device_metadata(a.device)
                targets = released.targets_of(a)
                results[a.device] = next(iter(targets.values()))
                planned.append((a.device, meta, targets))
            except Exception as exc:  # this device fails alone; the caller sees why
                results[a.device] = exc
        if planned:
            with self._lock():
                results.update(self._commit_many(planned, keys))
        return results

    def _commit_many(self, planned: list[tuple[str, Path, dict[str, TargetFile]]], keys: KeyStore) -> dict[str, Exception]:
        """Sign and commit each planned device's new targets (``_Batch``); the devices that failed, with why."""
        batch = _Batch(self, keys)
        if self.store is not None:  # the versions go on from the store's (another controller may have signed last)
            director_store.pull_newer(self.store, self.directory, [device for device, _, _ in planned])
        for device, meta, targets in planned:
            batch.sign(device, meta, targets)
        try:
            commit_batch([(meta, files) for meta, files in batch.commits.values()])
        except OSError as exc:
            return {**batch.failed, **dict.fromkeys(batch.commits, exc)}
        sets = batch.prune_and_read(self.keep_versions)
        if self.store is not None:  # in the lock: the store gets each device's commits in the order they were made
            batch.failed.update(director_store.push_devices(self.store, sets))
        return batch.failed

    @staticmethod
    def _target(image: ImageRepository, model: str, version: str, variant: str) -> TargetFile:
        return _Released(image).target(model, version, variant)

    def _publish(self, meta: Path, targets_md: Metadata[Targets], keys: KeyStore) -> None:
        """Sign ``targets_md`` (its version set above every file on disk), a snapshot and a timestamp naming it, and
        commit the three: the timestamp's rename is the commit. Then prune old versions (``SigningChain.publish``).
        The targets name the mirrors of the moment (none: the field is left out)."""
        mirrors = self.mirrors()
        if mirrors:
            targets_md.signed.unrecognized_fields[MIRRORS_FIELD] = mirrors
        else:
            targets_md.signed.unrecognized_fields.pop(MIRRORS_FIELD, None)
        with self._lock():
            self._chain().publish(meta, targets_md, keys, self.keep_versions)
            if self.store is not None:  # in the lock: the store gets this device's commits in the order they were made
                director_store.push_device(self.store, meta, meta.parent.name)

    def _prune(self, meta: Path) -> list[str]:
        ts: Metadata[Timestamp] = Metadata.from_file(str(meta / "timestamp.json"))
        snap: Metadata[Snapshot] = Metadata.from_file(str(meta / f"{ts.signed.snapshot_meta.version}.snapshot.json"))
        return prune_metadata(meta, committed_versions(snap), self.keep_versions)

    def prune(self, devices: list[str] | None = None) -> dict[str, list[str]]:
        """Delete all but the last ``keep_versions`` targets and snapshot versions of each device (and an interrupted
        assignment's leftovers); roots are never deleted (devices walk the chain). Publishing prunes by itself."""
        out = {}
        with self._lock():
            for device in devices or self.devices():
                meta = self.device_metadata(device)
                if (meta / "timestamp.json").is_file():
                    out[device] = self._prune(meta)
                    if self.store is not None:
                        director_store.push_device(self.store, meta, device)
        return out

    def rotate_key(self, keys: KeyStore, new_keys: int = 1, threshold: int = 1) -> Metadata[Root]:
        """New ``director`` keys: a new director root naming them for targets, snapshot and timestamp (signed by the
        root keys: bring them back online), every device's committed assignment re-signed with them, the old keys
        retired.

        Why in this order, under the lock: devices learn keys only from the root, so each device repository gets
        the new root first; the re-signing follows before any other writer can sign with the old key. A device
        that refreshes in between refuses the old-key metadata under the new root and retries. The old private
        key need not be present (rotating away a stolen key works); re-running after a crash rotates again.
        """
        with self._lock():
            return self._chain().rotate_key(keys, "director", self.root(), new_keys, threshold, self.write_root, lambda: self.refresh(keys))


@dataclass(frozen=True)
class Assignment:
    """One device's assignment in ``Director.assign_many``: what it runs, and optionally a shadow (version, variant)."""

    device: str
    model: str
    version: str
    variant: str
    shadow: tuple[str, str] | None = None


class _Released:
    """The image repository's targets, read once for a batch of assignments (one read, then a dictionary lookup)."""

    def __init__(self, image: ImageRepository) -> None:
        self.image = image
        self._targets: dict[str, TargetFile] | None = None

    def target(self, model: str, version: str, variant: str) -> TargetFile:
        """A fresh ``TargetFile`` naming the released variant (the caller may mark it a shadow)."""
        if self._targets is None:
            self._targets = dict(self.image.targets().signed.targets)
        path = variant_target_path(model, version, variant)
        released = self._targets.get(path)
        if released is None:
            self.image.ensure_not_revoked(model, version)
            if self.image.release_of(model, version) is None:
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

    def targets_of(self, a: Assignment) -> dict[str, TargetFile]:
        """The device's targets: the one it runs first, then its shadow if any."""
        target = self.target(a.model, a.version, a.variant)
        targets = {target.path: target}
        if a.shadow is not None:
            candidate = self.target(a.model, *a.shadow)
            if candidate.path == target.path:
                raise AssignError(f"{a.model} {a.version} cannot shadow itself")
            candidate.unrecognized_fields["custom"]["shadow"] = True
            targets[candidate.path] = candidate
        return targets


class _Batch:
    """One ``assign_many`` under the repository's lock: each device's files signed (``sign``), then committed together by
    the caller, then pruned and read back for the store (``prune_and_read``). What every device shares is read once."""

    def __init__(self, director: Director, keys: KeyStore) -> None:
        self.director = director
        self.chain = director._chain()
        self.signers = signers_of(keys, SIGNED_BY)
        self.mirrors = director.mirrors()
        d = director.directory
        self.roots = {p.name: p.read_bytes() for p in d.glob("*.root.json") if not p.name.startswith(".")}
        self.commits: dict[str, tuple[Path, list[tuple[str, bytes]]]] = {}
        self.listed: dict[str, tuple[list[str], dict[str, int]]] = {}  # device: (names before, committed versions)
        self.failed: dict[str, Exception] = {}

    def sign(self, device: str, meta: Path, targets: dict[str, TargetFile]) -> None:
        """The device's new targets, snapshot and timestamp, and the roots it lacks (a new device walks the whole
        chain), as files to commit: the roots and numbered files first, the timestamp last."""
        try:
            meta.mkdir(parents=True, exist_ok=True)
            names = os.listdir(meta)
            md = Metadata(Targets(expires=signing_time() + self.director.targets_expiry, targets=targets))
            if self.mirrors:
                md.signed.unrecognized_fields[MIRRORS_FIELD] = self.mirrors
            signed = self.chain.sign(names, timestamp_version(meta / "timestamp.json"), md, self.signers)
        except Exception as exc:  # this device fails alone
            self.failed[device] = exc
            return
        roots = [(name, body) for name, body in sorted(self.roots.items()) if name not in names]
        self.commits[device] = (meta, roots + signed.files)
        self.listed[device] = (names, signed.committed)

    def prune_and_read(self, keep: int) -> list[tuple[str, dict[str, bytes]]]:
        """After the commit: each device's old versions pruned, and its whole set (what the store keeps)."""
        sets = []
        for device, (meta, files) in self.commits.items():
            names, committed = self.listed[device]
            now = set(names) | {name for name, _ in files}
            gone = set(prune_metadata(meta, committed, keep, sorted(now)))
            written = dict(files)
            kept = [n for n in now - gone if n.endswith(".json") and not n.startswith(".")]
            body = {n: written[n] if n in written else (meta / n).read_bytes() for n in kept}
            sets.append((device, body))
        return sets
