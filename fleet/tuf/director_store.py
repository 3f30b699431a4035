"""Keep the director's files and the store's copy of them in step: what the leader signs reaches every controller.

Why files and a store: signing stays where it always was (``Director`` writes each device's repository under ROOT,
committed by the timestamp's rename, under the repository's flock), so a one-box controller without a store works
as before; with a store, each commit is also written there as the device's whole set in one transaction, and every
controller's repository server answers director requests from the store (``RepositoryServer(director_store=...)``).
The other direction matters as much: a controller that starts to lead copies into its own directory every device
whose store copy is newer (``sync``), and a writer pulls a device's newer copy before signing it (``pull_device``),
so versions go on from the store's and a device never sees one go back. The store refuses a set older than its own
(``StaleDirectorMetadata``). Versions are read from the signed JSON (the ``signed.version`` field); nothing is
verified here: devices verify everything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.files import atomic_write
from agent.wire import WireError, valid_device_id
from fleet.tuf.metadata import commit_metadata

__all__ = [
    "DIRECTOR",
    "TIMESTAMP",
    "DirectorStore",
    "Synced",
    "local_files",
    "pull_device",
    "pull_newer",
    "push_device",
    "push_devices",
    "push_director",
    "sync",
]

TIMESTAMP = "timestamp.json"
DIRECTOR = ""  # the store's "device" for the director's own files (fleet.store.director.DIRECTOR)
MIRRORS_FILE = "mirrors.json"


class DirectorStore(Protocol):
    """What of ``fleet.store.FleetStore`` the director needs (the store is not imported here: it knows nothing of TUF)."""

    def director_file(self, device: str, name: str) -> bytes | None: ...

    def director_files(self, device: str) -> dict[str, bytes]: ...

    def director_versions(self) -> dict[str, int]: ...

    def put_director_files(self, device: str, files: dict[str, bytes], timestamp_version: int) -> None: ...

    def director_versions_of(self, devices: Sequence[str]) -> dict[str, int]: ...

    def put_director_sets(self, sets: Sequence[tuple[str, dict[str, bytes], int]]) -> None: ...

    def add_director_files(self, device: str, files: dict[str, bytes]) -> None: ...


@dataclass(frozen=True)
class Synced:
    """What one ``sync`` moved: devices copied from the store into the directory, and from the directory into the store."""

    pulled: int
    pushed: int


def _version(body: bytes | None) -> int:
    """The ``signed.version`` of a metadata file's bytes; 0 for none or unreadable (anything beats it)."""
    if not body:
        return 0
    try:
        return int(json.loads(body)["signed"]["version"])
    except (ValueError, KeyError, TypeError):
        return 0


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def local_files(meta: Path) -> dict[str, bytes]:
    """Every metadata file of a device's directory (temp files of a commit in progress left out)."""
    out = {}
    for p in meta.glob("*.json"):
        if not p.name.startswith("."):
            data = _read(p)
            if data is not None:
                out[p.name] = data
    return out


def push_device(store: DirectorStore, meta: Path, device: str) -> bool:
    """``device``'s committed set into the store (whole, one transaction); False when it has none yet."""
    files = local_files(meta)
    if TIMESTAMP not in files:
        return False
    store.put_director_files(device, files, _version(files[TIMESTAMP]))
    return True


def push_devices(store: DirectorStore, sets: Sequence[tuple[str, dict[str, bytes]]]) -> dict[str, Exception]:
    """Many devices' committed sets (device, files) into the store in one transaction; when that is refused (one
    device's store copy went ahead: ``StaleDirectorMetadata``), each alone, so only that one fails. The devices that
    failed, with why."""
    whole = [(device, files, _version(files[TIMESTAMP])) for device, files in sets if TIMESTAMP in files]
    try:
        store.put_director_sets(whole)
        return {}
    except Exception:
        pass
    failed: dict[str, Exception] = {}
    for device, files, version in whole:
        try:
            store.put_director_files(device, files, version)
        except Exception as exc:
            failed[device] = exc
    return failed


def pull_newer(store: DirectorStore, directory: Path, devices: Sequence[str]) -> int:
    """``pull_device`` for each of ``devices`` whose store copy is newer than its file (one query for all); how many
    were pulled. Hold the repository's lock."""
    stored = store.director_versions_of(devices)
    pulled = 0
    for device in devices:
        meta = directory / device / "metadata"
        if stored.get(device, 0) > _version(_read(meta / TIMESTAMP)):
            pulled += pull_device(store, meta, device)
    return pulled


def push_director(store: DirectorStore, directory: Path) -> None:
    """The director's own roots and mirror list (what a controller that starts to lead needs to sign new devices)."""
    files = {p.name: p.read_bytes() for p in directory.glob("*.root.json") if not p.name.startswith(".")}
    mirrors = _read(directory / MIRRORS_FILE)
    if mirrors is not None:
        files[MIRRORS_FILE] = mirrors
    if files:
        store.add_director_files(DIRECTOR, files)


def pull_device(store: DirectorStore, meta: Path, device: str) -> bool:
    """Copy ``device``'s set from the store into ``meta`` when the store's timestamp is newer than the file's (the
    numbered files first, the timestamp last: the same commit order as signing); True when it did. Hold the
    repository's lock."""
    local = _read(meta / TIMESTAMP)
    stored = store.director_file(device, TIMESTAMP)
    if stored is None or stored == local or _version(stored) <= _version(local):
        return False
    files = store.director_files(device)
    meta.mkdir(parents=True, exist_ok=True)
    ordered = sorted((n, b) for n, b in files.items() if n != TIMESTAMP and _read(meta / n) != b)
    commit_metadata(meta, [*ordered, (TIMESTAMP, files[TIMESTAMP])])
    return True


def _pull_director(store: DirectorStore, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in store.director_files(DIRECTOR).items():
        if _read(directory / name) != body:
            atomic_write(directory / name, body)


def sync(store: DirectorStore, directory: Path, devices: list[str]) -> Synced:
    """Bring the directory and the store level, device by device, the newer copy winning (``devices``: those the
    directory has). A controller runs it when it starts to lead and every re-signing round: what ``fleet assign`` or
    a key rotation wrote to the files without a store reaches the store, and what another leader signed reaches
    this directory. Hold the repository's lock."""
    _pull_director(store, directory)
    stored = store.director_versions()
    pulled = pushed = 0
    newer_here: list[tuple[str, Path]] = []
    for device in sorted(set(stored) | set(devices)):
        try:
            meta = directory / valid_device_id(device) / "metadata"
        except WireError:
            continue  # the director's own row ("") and anything that is no device id
        here = _version(_read(meta / TIMESTAMP))
        there = stored.get(device, 0)
        if there > here:
            pulled += pull_device(store, meta, device)
        elif here > there:
            newer_here.append((device, meta))
    for i in range(0, len(newer_here), SYNC_BATCH):  # a first lead over 10,000 devices' files: 50 transactions, not 10,000
        sets = [(device, local_files(meta)) for device, meta in newer_here[i : i + SYNC_BATCH]]
        whole = [(device, files) for device, files in sets if TIMESTAMP in files]
        pushed += len(whole) - len(push_devices(store, whole))
    push_director(store, directory)
    return Synced(pulled, pushed)


SYNC_BATCH = 200  # devices' sets pushed in one transaction by ``sync``
