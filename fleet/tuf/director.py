"""The director repository: what each device must run, signed online (Uptane's second repository).

One TUF repository per device — under ``DIR/{device}/metadata`` on one box, as rows of the store with one
(``fleet.tuf.director_repos``); they share one root (``DIR/N.root.json``, signed by the offline root keys once, at
``Director.create``) that gives the online ``director`` key the targets, snapshot and timestamp roles. A device's
targets name exactly one bundle to run (by the image repository's path, length and
hashes) and the variant it should install, and at most one more marked as a shadow
(shadow mode); the agent installs only what both repositories agree on.

An assignment is committed when the device's ``timestamp.json`` names it: on files, targets, snapshot and
timestamp are written under temporary names and renamed in that order (``commit_batch``); in the store, one
transaction. So a ``fleet assign`` killed at any point leaves the old assignment or the new one, and ``refresh``
re-signs only what the timestamp names. Signing reads as its steps: list the devices' repositories, sign each
(``_Batch``), commit them together.
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
from fleet.store.director import DirectorRootChanged, StaleDirectorMetadata
from fleet.tuf import director_store
from fleet.tuf.director_repos import Commit, FileRepositories, Listing, Repositories, StoreRepositories
from fleet.tuf.director_store import DirectorStore, Synced
from fleet.tuf.image_repo import ImageRepository, variant_target_path
from fleet.tuf.keys import KeyStore
from fleet.tuf.metadata import (
    KEEP_VERSIONS,
    SigningChain,
    committed_versions,
    encode,
    metadata_versions,
    prune_metadata,
    repository_lock,
    signers_of,
    signing_time,
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
        """``store``: the device repositories are there and nowhere else (several controllers; the directory keeps the
        director's roots and mirror list, and ``sync`` brings in what was signed into files); None: the files alone."""
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1 (the committed version), got {keep_versions}")
        self.directory = Path(directory)
        self.targets_expiry = targets_expiry
        self.timestamp_expiry = timestamp_expiry
        self.keep_versions = keep_versions
        self.root_expiry = root_expiry
        self.store = store
        self._seen: director_store.FileVersions = {}  # what ``sync`` read of the device files, for its next round

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
        if not versions:
            raise AssignError(f"{self.directory} holds no director root (run `fleet director init`)")
        return Metadata.from_file(str(self.directory / f"{versions[-1]}.root.json"))

    def write_root(self, md: Metadata[Root]) -> None:
        """A new root for every device: each device repository gets a copy (devices walk the root chain)."""
        data = encode(md)
        name = f"{md.signed.version}.root.json"
        with self._lock():
            if self.store is not None:  # first: another host's root of this version refuses it before anything holds it
                self.store.add_director_files(director_store.DIRECTOR, {name: data})
            atomic_write(self.directory / name, data)
            self.repos.add_root(name, data)

    @property
    def repos(self) -> Repositories:
        """Where the device repositories are: the store when there is one (every controller serves from it), else the
        files under the directory (``fleet.tuf.director_repos``)."""
        return StoreRepositories(self.store) if self.store is not None else FileRepositories(self.directory)

    def devices(self) -> list[str]:
        return self.repos.devices()

    def timestamps(self, devices: Sequence[str]) -> dict[str, bytes]:
        """Each device's committed ``timestamp.json`` (what announcing sends and the re-signing checks for expiry)."""
        return self.repos.timestamps(devices)

    def refresh(self, keys: KeyStore, devices: list[str] | None = None) -> None:
        """Re-sign each device's committed targets, snapshot and timestamp (all online) before they expire.

        Only the committed assignment (the one ``timestamp.json`` names) is re-signed: a targets file an
        interrupted ``assign`` left behind is never published by a routine refresh. All devices are committed
        together; a device that could not be raises its error afterwards (the others are re-signed).
        """
        with self._lock():
            repos = self.repos
            wanted = list(dict.fromkeys(devices or repos.devices()))
            batch = _Batch(self, keys, repos.listings(wanted))
            for device in wanted:
                try:
                    md = self.committed_targets(device)
                except Exception as exc:  # one broken repository (or id) holds up nobody else's re-signing
                    batch.failed[device] = exc
                    continue
                if md is not None:
                    batch.sign(device, dict(md.signed.targets))
            batch.failed.update(repos.commit(batch.commits, self.keep_versions))
        if batch.failed:
            raise next(iter(batch.failed.values()))

    def sync(self) -> Synced:
        """With a store: the director's roots and mirror list level between the directory and the store, and every
        device repository the directory holds newer than the store's pushed there (what ``fleet assign`` or a key
        rotation without the store signed, or a one-box director moving onto a store). A controller runs it when it
        starts to lead and every re-signing round. Without a store: nothing."""
        if self.store is None:
            return Synced(0)
        with self._lock():
            return director_store.sync(self.store, self.directory, FileRepositories(self.directory).devices(), self._seen)

    def device_metadata(self, device: str) -> Path:
        """A device's repository directory (the files of a director without a store)."""
        return FileRepositories(self.directory).meta(device)

    def committed_targets(self, device: str) -> Metadata[Targets] | None:
        """The targets the device's timestamp leads to (through its snapshot): what the device is told; None before
        its first assignment."""
        repos = self.repos
        ts = repos.read(device, "timestamp.json")
        if ts is None:
            return None
        ts_md: Metadata[Timestamp] = Metadata.from_bytes(ts)
        snap: Metadata[Snapshot] = Metadata.from_bytes(_required(repos, device, f"{ts_md.signed.snapshot_meta.version}.snapshot.json"))
        return Metadata.from_bytes(_required(repos, device, f"{snap.signed.meta['targets.json'].version}.targets.json"))

    def assigned(self, model: str, version: str) -> list[str]:
        """Devices whose committed assignment names ``model`` ``version`` (to run or as a shadow)."""
        out = []
        for device in self.devices():
            md = self.committed_targets(device)
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
        mirrors, the key) is read once, every device's repository is read in one listing and the commits are made
        together: on files with three filesystem syncs in all (``commit_batch``) instead of four fsyncs per device,
        in the store in one transaction. A device sees its old assignment or its new one, as with ``assign``."""
        results: dict[str, TargetFile | Exception] = {}
        planned: list[tuple[str, dict[str, TargetFile]]] = []
        released = _Released(image)
        for a in assignments:
            try:
                if a.device in results:
                    raise AssignError(f"{a.device} is assigned twice in one batch")
                valid_device_id(a.device)
                targets = released.targets_of(a)
                results[a.device] = next(iter(targets.values()))
                planned.append((a.device, targets))
            except Exception as exc:  # this device fails alone; the caller sees why
                results[a.device] = exc
        if planned:
            with self._lock():
                results.update(self._commit_many(planned, keys))
        return results

    def _commit_many(self, planned: list[tuple[str, dict[str, TargetFile]]], keys: KeyStore) -> dict[str, Exception]:
        """Sign each planned device's new targets from its repository as listed now (``_Batch``) and commit them all;
        the devices that failed, with why. A device another writer committed in between (``StaleDirectorMetadata``:
        a controller's re-signing, a command with ``--store``) is listed and signed once more: a race, not a fault."""
        repos = self.repos
        failed: dict[str, Exception] = {}
        for attempt in range(2):
            batch = _Batch(self, keys, repos.listings([device for device, _ in planned]))
            for device, targets in planned:
                batch.sign(device, targets)
            batch.failed.update(repos.commit(batch.commits, self.keep_versions))
            failed.update(batch.failed)
            moved_on = next((e for e in batch.failed.values() if isinstance(e, DirectorRootChanged)), None)
            if moved_on is not None and attempt > 0:  # a root landed during the retry too: the controller's trouble, no device's
                raise moved_on
            planned = [(device, targets) for device, targets in planned if isinstance(batch.failed.get(device), StaleDirectorMetadata)]
            if not planned:
                break
            for device, _ in planned:
                failed.pop(device, None)
        return failed

    @staticmethod
    def _target(image: ImageRepository, model: str, version: str, variant: str) -> TargetFile:
        return _Released(image).target(model, version, variant)

    def _publish(self, device: str, targets_md: Metadata[Targets], keys: KeyStore) -> None:
        """Sign ``targets_md``'s targets anew for ``device`` (a version above every one it has), with a snapshot and a
        timestamp naming them, and commit (``refresh`` for one device, with the targets given)."""
        with self._lock():
            repos = self.repos
            batch = _Batch(self, keys, repos.listings([device]))
            batch.sign(device, dict(targets_md.signed.targets))
            batch.failed.update(repos.commit(batch.commits, self.keep_versions))
        if batch.failed:
            raise batch.failed[device]

    def _prune(self, meta: Path) -> list[str]:
        ts: Metadata[Timestamp] = Metadata.from_file(str(meta / "timestamp.json"))
        snap: Metadata[Snapshot] = Metadata.from_file(str(meta / f"{ts.signed.snapshot_meta.version}.snapshot.json"))
        return prune_metadata(meta, committed_versions(snap), self.keep_versions)

    def prune(self, devices: list[str] | None = None) -> dict[str, list[str]]:
        """Delete all but the last ``keep_versions`` targets and snapshot versions of each device (and an interrupted
        assignment's leftovers); roots are never deleted (devices walk the chain). Publishing prunes by itself, and a
        store's commits are whole transactions that leave nothing behind: there, nothing to do."""
        out: dict[str, list[str]] = {}
        if self.store is not None:
            return out
        with self._lock():
            for device in devices or self.devices():
                meta = self.device_metadata(device)
                if (meta / "timestamp.json").is_file():
                    out[device] = self._prune(meta)
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
            if self.store is not None:  # rotate from the newest root, wherever it was made (never a second root N)
                director_store.pull_director(self.store, self.directory)
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
    """One batch of commits under the repository's lock: each device's files signed (``sign``) from its listing, for
    the caller to commit together. What every device shares (roots, mirrors, the key) is read once."""

    def __init__(self, director: Director, keys: KeyStore, listings: dict[str, Listing]) -> None:
        self.director = director
        self.chain = director._chain()
        if director.store is not None:  # a rotation on another host may have added a root since the last sync
            director_store.pull_director(director.store, director.directory)
        self.root = director.root().signed
        self.signers = signers_of(keys, SIGNED_BY, self.root)
        for role in DIRECTOR_ROLES:
            self.signers(role)  # keys the newest root no longer trusts fail the whole batch here, not each device
        self.mirrors = director.mirrors()
        d = director.directory
        self.roots = {p.name: p.read_bytes() for p in d.glob("*.root.json") if not p.name.startswith(".")}
        self.listings = listings
        self.commits: list[Commit] = []
        self.failed: dict[str, Exception] = {}

    def sign(self, device: str, targets: dict[str, TargetFile]) -> None:
        """The device's new targets, snapshot and timestamp, and the roots it lacks (a new device walks the whole
        chain), as one commit: the roots and numbered files first, the timestamp last."""
        before = self.listings.get(device, Listing())
        try:
            md = Metadata(Targets(expires=signing_time() + self.director.targets_expiry, targets=targets))
            if self.mirrors:
                md.signed.unrecognized_fields[MIRRORS_FIELD] = self.mirrors
            signed = self.chain.sign(before.names, before.timestamp, md, self.signers)
        except Exception as exc:  # this device fails alone
            self.failed[device] = exc
            return
        roots = [(name, body) for name, body in sorted(self.roots.items()) if name not in before.names]
        self.commits.append(Commit(device, before, roots + signed.files, signed.committed, self.root.version))


def _required(repos: Repositories, device: str, name: str) -> bytes:
    """A file the device's committed timestamp leads to: missing is a broken repository, said as such."""
    body = repos.read(device, name)
    if body is None:
        raise AssignError(f"the director repository of {device} lacks {name}, which its timestamp names")
    return body
