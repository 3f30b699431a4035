"""The signing chain both repositories use: root creation, sign → snapshot → timestamp, commit and pruning of
metadata versions, the repository lock, and key and root rotation.

Why one module: the image repository and the director are two TUF repositories that differ only in who signs what
(the image repository has a key per role; the director's one online ``director`` key signs targets, snapshot and
timestamp) and in how long metadata lasts. A ``SigningChain`` names exactly that; everything that follows from it
— the version numbers, the order of the renames that commits an update, what pruning keeps, how a rotation is
checked before anything is written — is written here once, so the two repositories cannot drift apart.
Nothing here knows either repository: they hand in their directories, their keys and (for root rotation) themselves
as ``HoldsRoot``.
"""

from __future__ import annotations

import copy
import ctypes
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

from securesystemslib.signer import Signer
from tuf.api.exceptions import BadVersionNumberError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from agent.errors import EdgefleetError
from fleet.tuf.keys import KeyStore, UntrustedSigningKey

__all__ = [
    "KEEP_VERSIONS",
    "HoldsRoot",
    "RotationError",
    "SigningChain",
    "Signed",
    "commit_batch",
    "commit_metadata",
    "committed_versions",
    "encode",
    "metadata_versions",
    "prune_metadata",
    "pruned_names",
    "repository_lock",
    "root_with_keys",
    "rotate_root",
    "rotated_root",
    "sign_metadata",
    "signers_of",
    "signing_time",
    "timestamp_version",
    "verify_next_root",
    "versions_in",
]

KEEP_VERSIONS = 3  # targets/snapshot versions kept per repository: a device mid-refresh still finds the one it was told
LOCK_FILE = ".lock"


class RotationError(EdgefleetError):
    """A key rotation that cannot be done (unknown role, too few keys for the threshold, root keys missing);
    nothing was written."""

    code = "bad_rotation"


def signing_time() -> datetime:
    """Now, in UTC and whole seconds: what every expiry counts from (TUF's dates have no fractions)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


_COMPACT = JSONSerializer(compact=True)


def encode(md: Metadata[Any]) -> bytes:
    """The bytes on disk and on the wire: python-tuf's JSON, compact (signatures cover the canonical form, not these
    bytes). Why not indented: json's C encoder runs only without an indent; indented, the three files of every
    device a wave moves took 0.26 ms each to write instead of 0.1, and were a fifth larger for every device to fetch."""
    return md.to_bytes(_COMPACT)


def sign_metadata(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    """Replace every signature with one from each signer (threshold signing)."""
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)


@dataclass(frozen=True)
class Signed:
    """One commit of a repository, signed and not yet written: its files in commit order (the timestamp last) and
    the versions the timestamp stands for (what pruning keeps)."""

    files: list[tuple[str, bytes]]
    committed: dict[str, int]


def timestamp_version(path: Path) -> int:
    """The ``signed.version`` of the timestamp at ``path``; 0 when there is none (the first commit is version 1)."""
    try:
        return int(json.loads(path.read_bytes())["signed"]["version"])
    except FileNotFoundError:
        return 0


class HoldsRoot(Protocol):
    """A repository whose root the shared root keys sign (both repositories): read its newest root, add a new one."""

    def root(self) -> Metadata[Root]: ...

    def write_root(self, md: Metadata[Root]) -> None: ...


@dataclass(frozen=True)
class SigningChain:
    """How one repository signs: the ``KeyStore`` role whose keys sign each TUF role, and how long each lasts.

    ``signed_by`` maps every TUF role (root, targets, snapshot, timestamp) to a key role; the root is always
    signed by the ``root`` keys, which both repositories share.
    """

    signed_by: Mapping[str, str]
    root_expiry: timedelta
    snapshot_expiry: timedelta
    timestamp_expiry: timedelta

    def new_root(self, keys: KeyStore) -> Metadata[Root]:
        """Version 1 of the root: each role trusts its key role's public keys and threshold; signed by the root keys."""
        root = Root(expires=signing_time() + self.root_expiry, consistent_snapshot=True)
        for role, key_role in self.signed_by.items():
            for key in keys.public_keys(key_role):
                root.add_key(key, role)
            root.roles[role].threshold = keys.threshold(key_role)
        md = Metadata(root)
        sign_metadata(md, keys.signers("root"))
        return md

    def publish(self, meta: Path, targets: Metadata[Targets] | int, keys: KeyStore, keep: int, root: Root) -> None:
        """Sign ``targets`` (or, given a version, name the committed targets again), a snapshot naming it and a
        timestamp naming that; commit the three (the timestamp's rename is the commit), then prune old versions.

        Versions go above every file on disk (an uncommitted one a crash left behind included), so a numbered
        file, once a device may have fetched it, is never rewritten with other content (mirrors cache them).
        Hold the repository's lock. Only the keys that sign something are loaded: re-signing the snapshot and
        timestamp never needs the offline targets key; they must be keys ``root`` (the newest) trusts (``signers_of``).
        """
        names = os.listdir(meta)
        signed = self.sign(names, timestamp_version(meta / "timestamp.json"), targets, signers_of(keys, self.signed_by, root))
        commit_metadata(meta, signed.files)
        prune_metadata(meta, signed.committed, keep)

    def sign(
        self, names: Collection[str], current_timestamp: int, targets: Metadata[Targets] | int, signers: Callable[[str], Sequence[Signer]]
    ) -> Signed:
        """The files of one commit, in commit order (targets, snapshot, timestamp last), for a repository whose
        directory holds ``names`` and whose timestamp is at ``current_timestamp`` (0: none yet); nothing is written.
        ``signers``: ``signers_of(keys, ...)`` (loaded once: a batch signs many repositories with the same keys)."""
        now = signing_time()
        files: list[tuple[str, bytes]] = []
        if isinstance(targets, int):
            targets_version = targets
        else:
            targets.signed.version = targets_version = max(versions_in(names, "targets"), default=0) + 1
            sign_metadata(targets, signers("targets"))
            files.append((f"{targets_version}.targets.json", encode(targets)))
        snapshot = Snapshot(
            version=max(versions_in(names, "snapshot"), default=0) + 1,
            expires=now + self.snapshot_expiry,
            meta={"targets.json": MetaFile(version=targets_version)},
        )
        snapshot_md = Metadata(snapshot)
        sign_metadata(snapshot_md, signers("snapshot"))
        files.append((f"{snapshot.version}.snapshot.json", encode(snapshot_md)))
        timestamp = Timestamp(
            version=current_timestamp + 1, expires=now + self.timestamp_expiry, snapshot_meta=MetaFile(version=snapshot.version)
        )
        timestamp_md = Metadata(timestamp)
        sign_metadata(timestamp_md, signers("timestamp"))
        files.append(("timestamp.json", encode(timestamp_md)))
        return Signed(files, {"snapshot": snapshot.version, "targets": targets_version})

    def rotate_key(
        self,
        keys: KeyStore,
        key_role: str,
        current: Metadata[Root],
        new_keys: int,
        threshold: int,
        write_root: Callable[[Metadata[Root]], None],
        resign: Callable[[], None],
    ) -> Metadata[Root]:
        """New keys for ``key_role``: a root naming them for every TUF role it signs (signed by the root keys), written
        by ``write_root``; then ``keys.json``, the re-signing (``resign``) and last the old private keys retired.

        Why in this order, under the repository's lock: devices learn keys only from the root, so the root goes
        first; the re-signing follows before any other writer can sign with the old key. A device that refreshes
        in between refuses the old-key metadata under the new root and retries. The old private keys need not be
        present (rotating away a lost or stolen key works); re-running after a crash rotates again, retiring the
        keys of the interrupted attempt too.
        """
        roles = [role for role, signer in self.signed_by.items() if signer == key_role and role != "root"]
        root_signers = keys.signers("root")
        old_keyids = {k for role in roles for k in current.signed.roles[role].keyids}
        old_keyids |= {k.keyid for k in keys.public_keys(key_role)}
        new_signers = keys.generate(key_role, new_keys)
        try:
            md = root_with_keys(current, roles, new_signers, threshold, root_signers, self.root_expiry)
            write_root(md)  # refused (another host's rotation from the same root): the new keys go, nothing else changed
        except Exception:
            keys.forget(key_role, new_signers)
            raise
        keys.set_role(key_role, new_signers, threshold)
        resign()
        keys.retire(key_role, old_keyids - {s.public_key.keyid for s in new_signers})
        return md


def signers_of(keys: KeyStore, signed_by: Mapping[str, str], root: Root) -> Callable[[str], Sequence[Signer]]:
    """Each TUF role's signers: the keys of its key role that ``root`` (the repository's newest) names for it,
    loaded on first use and once per key role (the director's key signs three roles).

    Why checked against the root: on several controllers the keys directory is each host's own, and a rotation
    made on one host leaves the others with keys the new root no longer trusts; what they signed would be
    refused by every device (and, committed after the rotation's re-signing, would hide it). Fewer trusted keys
    than the role's threshold is ``UntrustedSigningKey``, before anything is signed."""
    loaded: dict[str, Sequence[Signer]] = {}

    def signers(role: str) -> Sequence[Signer]:
        key_role = signed_by[role]
        if key_role not in loaded:
            loaded[key_role] = keys.signers(key_role)
        trusted = root.roles[role].keyids
        here = [s for s in loaded[key_role] if s.public_key.keyid in trusted]
        if len(here) < root.roles[role].threshold:
            raise UntrustedSigningKey(
                f"root version {root.version} trusts other {key_role} keys for {role} than those in {keys.directory}"
                f" ({len(here)} of the {root.roles[role].threshold} needed): rotated on another host? copy its"
                f" keys.json and {key_role}-*.pem here"
            )
        return here

    return signers


def rotate_root(
    keys: KeyStore, repositories: Sequence[HoldsRoot], new_root_keys: int, new_threshold: int, lifetime: timedelta
) -> list[Metadata[Root]]:
    """A new root for each of ``repositories`` with fresh root keys, signed by the old root keys (threshold) and the
    new ones; the new roots, in the same order.

    Every new root is checked against both the old and the new root before anything is written; ``keys.json``
    changes and the old private keys are deleted only after every repository holds its new root (a repository left
    on the old root could never be re-signed by the new keys).
    """
    old_signers = keys.signers("root")
    new_signers = keys.generate("root", new_root_keys)
    try:
        roots = [rotated_root(r.root(), old_signers, new_signers, new_threshold, lifetime) for r in repositories]
    except Exception:
        keys.forget("root", new_signers)
        raise
    for repository, md in zip(repositories, roots):
        repository.write_root(md)
    keys.set_role("root", new_signers, new_threshold)
    keys.forget("root", old_signers)
    return roots


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
    root.expires = signing_time() + lifetime
    md = Metadata(root)
    sign_metadata(md, signers)
    try:
        verify_next_root(current, md)
    except Exception as exc:  # python-tuf's UnsignedMetadataError and friends
        raise RotationError(f"root rotation would not verify ({exc}); {advice}") from exc
    return md


def verify_next_root(current: Metadata[Root], md: Metadata[Root]) -> None:
    """``md`` is the root after ``current`` as a device checks it: the next version, signed by the threshold of the
    keys ``current`` names (those the devices trust now) and of its own; python-tuf's errors otherwise."""
    if md.signed.version != current.signed.version + 1:
        raise BadVersionNumberError(f"root version {md.signed.version} does not follow {current.signed.version}")
    current.verify_delegate("root", md)
    md.verify_delegate("root", md)


def rotated_root(current: Metadata[Root], old: Sequence[Signer], new: Sequence[Any], threshold: int, lifetime: timedelta) -> Metadata[Root]:
    """The next root version trusting ``new`` root keys; raises ``RotationError`` unless old and new roots both accept it."""
    return root_with_keys(current, ["root"], new, threshold, [*old, *new], lifetime, "bring back enough old root keys")


def metadata_versions(directory: Path, role: str) -> list[int]:
    """The version numbers of ``{N}.{role}.json`` files in ``directory``, ascending (temp files never match)."""
    return versions_in(os.listdir(directory), role)


def versions_in(names: Iterable[str], role: str) -> list[int]:
    """The version numbers of the ``{N}.{role}.json`` among ``names`` (a directory's listing), ascending."""
    suffix = f".{role}.json"
    out = []
    for name in names:
        if name.endswith(suffix):
            head = name[: -len(suffix)]
            if head.isdigit():
                out.append(int(head))
    return sorted(out)


def committed_versions(snapshot: Metadata[Snapshot]) -> dict[str, int]:
    """The snapshot and targets versions the committed ``snapshot`` (the one ``timestamp.json`` names) stands for."""
    return {"snapshot": snapshot.signed.version, "targets": snapshot.signed.meta["targets.json"].version}


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


def prune_metadata(directory: Path, committed: dict[str, int], keep: int, names: Collection[str] | None = None) -> list[str]:
    """Delete ``pruned_names`` from ``directory``; the names deleted. Call it holding the repository's lock: a version
    above the committed one is then never a writer's work in progress. ``names``: the directory's listing when the
    caller has it (a batch does), else it is listed here."""
    removed = pruned_names(os.listdir(directory) if names is None else names, committed, keep)
    for name in removed:
        (directory / name).unlink(missing_ok=True)
    return removed


def pruned_names(names: Collection[str], committed: dict[str, int], keep: int) -> list[str]:
    """Of a repository holding ``names``: per role in ``committed`` (targets, snapshot), every version but the ``keep``
    newest up to the committed one, every version above it (a crash's leftovers), and stale temp files. Nothing is
    deleted here: a directory and a store prune the same way."""
    removed = []
    for role, current in committed.items():
        versions = versions_in(names, role)
        kept = set([v for v in versions if v <= current][-keep:])
        removed += [f"{v}.{role}.json" for v in versions if v not in kept]
    removed += [name for name in names if name.startswith(".") and ".json." in name and name.endswith(".tmp")]
    return removed


def commit_batch(commits: Sequence[tuple[Path, Sequence[tuple[str, bytes]]]]) -> None:
    """``commit_metadata`` for many repositories at once, with three filesystem syncs in all instead of an fsync per
    file: every file is written under a temporary name, then synced; every numbered file renamed into place, synced;
    then every ``timestamp.json`` (each repository's last file) renamed, synced.

    Why it is as safe as one commit at a time: a timestamp's rename (the commit a device sees) happens only after
    everything it names is durable under its final name, and the call returns only once the renames themselves are
    durable (a power cut cannot bring an older timestamp back after a device was told of the new one). A crash
    before the last sync leaves each repository on its old timestamp or its new one, each complete. One repository
    alone: its files and its directory are fsynced instead (a filesystem sync also waits for everyone else's writes).
    """
    staged: list[tuple[Path, str, str]] = []  # (directory, temp path, final name)
    try:
        for directory, files in commits:
            for name, data in files:
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
                staged.append((directory, tmp, name))
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        if not staged:
            return
        _make_durable(staged, len(commits) > 1, renamed=False)
        for last in (False, True):  # the numbered files, then the timestamps
            for directory, tmp, name in staged:
                if (name == "timestamp.json") is last:
                    os.replace(tmp, directory / name)
            _make_durable(staged, len(commits) > 1, renamed=True)
    finally:
        for _, tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def _make_durable(staged: list[tuple[Path, str, str]], many: bool, renamed: bool) -> None:
    """What was just done to ``staged`` durable: one ``syncfs`` of the filesystem for ``many`` repositories (Linux;
    all of a director's device repositories are on one), else an fsync of each file written (before the renames)
    or of each directory (after them)."""
    directories = {d for d, _, _ in staged}
    anchor = staged[0][0]
    if many and _syncfs is not None and _same_filesystem(directories, anchor):
        fd = os.open(anchor, os.O_RDONLY)
        try:
            if _syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), f"syncfs failed on {anchor}")
        finally:
            os.close(fd)
    elif renamed:
        for directory in directories:
            _fsync_dir(directory)
    else:
        for _, tmp, _ in staged:
            _fsync_path(Path(tmp))


def _same_filesystem(directories: set[Path], anchor: Path) -> bool:
    device = os.stat(anchor).st_dev
    return all(os.stat(d).st_dev == device for d in directories)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_syncfs = _load_syncfs()


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
