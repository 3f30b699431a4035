"""Bring a director's files into the store: what a director signed without one reaches every controller.

Why: with a store, the store is the director's repository (``fleet.tuf.director_repos.StoreRepositories``): the
leader signs into it and every controller serves from it. Files still exist in two cases, both handled here: the
director's own roots and mirror list (``DIR/N.root.json``, ``DIR/mirrors.json``: what ``fleet director init``,
``fleet keys rotate`` and ``fleet director mirrors`` write), kept in the store under device "" and copied back
into a controller's directory when it starts to lead; and device repositories signed with files alone (a one-box
director before it had a store, or a command run without ``--store``), pushed into the store when newer than its
copy (``sync``). The store refuses a set older than its own (``StaleDirectorMetadata``), so a copy left behind can
never take a device back, and a set that names an older root than the store's newest (``DirectorRootChanged``).
Versions are read from the signed JSON (the ``signed.version`` field). Device sets are not verified here (devices
verify everything), but the director's roots taken from the store are: each must be signed as the root before it
demands (``UntrustedDirectorRoot``), since a controller signs under the newest one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tuf.api.metadata import Metadata, Root

from agent.errors import EdgefleetError
from agent.files import atomic_write
from agent.wire import WireError, valid_device_id
from fleet.store.director import DirectorRootChanged, DirectorSet
from fleet.tuf.metadata import verify_next_root

__all__ = [
    "DIRECTOR",
    "TIMESTAMP",
    "DirectorStore",
    "UntrustedDirectorRoot",
    "Synced",
    "local_files",
    "push_device",
    "push_devices",
    "pull_director",
    "push_director",
    "put_sets",
    "sync",
]

TIMESTAMP = "timestamp.json"
DIRECTOR = ""  # the store's "device" for the director's own files (fleet.store.director.DIRECTOR)
MIRRORS_FILE = "mirrors.json"
ROOT_NAME = re.compile(r"[1-9][0-9]{0,8}\.root\.json")  # ``N.root.json``: the only root names taken from the store


class UntrustedDirectorRoot(EdgefleetError):
    """A director root in the store that this host's roots do not lead to (not signed as the root before it demands,
    not the next version, not a root at all, or another root under a version this host holds): nothing is taken."""

    code = "untrusted_director_root"


class DirectorStore(Protocol):
    """What of ``fleet.store.FleetStore`` the director needs (the store is not imported here: it knows nothing of TUF)."""

    def director_file(self, device: str, name: str) -> bytes | None: ...

    def director_files(self, device: str) -> dict[str, bytes]: ...

    def director_versions(self) -> dict[str, int]: ...

    def director_versions_of(self, devices: Sequence[str]) -> dict[str, int]: ...

    def director_listing(self, devices: Sequence[str]) -> dict[str, dict[str, int]]: ...

    def director_timestamps(self, devices: Sequence[str]) -> dict[str, bytes]: ...

    def put_director_files(self, device: str, files: dict[str, bytes], timestamp_version: int) -> None: ...

    def put_director_sets(self, sets: Sequence[DirectorSet]) -> None: ...

    def add_director_files(self, device: str, files: dict[str, bytes]) -> None: ...


@dataclass(frozen=True)
class Synced:
    """What one ``sync`` found: device repositories pushed from the directory into the store, and those whose files
    are behind the store's (left alone: signed there without the store after it took over, they never reach a device)."""

    pushed: int
    behind: int = 0


def _device_id(name: str) -> bool:
    try:
        valid_device_id(name)
        return True
    except WireError:  # a directory that is no device's: never pushed as one
        return False


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
    return put_sets(
        store,
        [DirectorSet(device, files, _version(files[TIMESTAMP]), root=_newest_root(files)) for device, files in sets if TIMESTAMP in files],
    )


def _newest_root(files: dict[str, bytes]) -> int:
    """The newest root a device's set carries: what it was signed under (the store refuses it below its own newest)."""
    return max((int(n.split(".", 1)[0]) for n in files if ROOT_NAME.fullmatch(n)), default=0)


def put_sets(store: DirectorStore, sets: Sequence[DirectorSet]) -> dict[str, Exception]:
    """``sets`` into the store in one transaction; when that is refused (a device's store copy went ahead:
    ``StaleDirectorMetadata``), each alone, so only that one fails. The devices that failed, with why."""
    try:
        store.put_director_sets(sets)
        return {}
    except DirectorRootChanged as exc:  # signed under a root the store has moved past: every set alike, none retried
        return {s.device: exc for s in sets}
    except Exception:
        pass
    failed: dict[str, Exception] = {}
    for s in sets:
        try:
            store.put_director_sets([s])
        except Exception as exc:
            failed[s.device] = exc
    return failed


def push_director(store: DirectorStore, directory: Path) -> None:
    """The director's own roots and mirror list (what a controller that starts to lead needs to sign new devices)."""
    files = {p.name: p.read_bytes() for p in directory.glob("*.root.json") if not p.name.startswith(".")}
    mirrors = _read(directory / MIRRORS_FILE)
    if mirrors is not None:
        files[MIRRORS_FILE] = mirrors
    if files:
        store.add_director_files(DIRECTOR, files)


def pull_director(store: DirectorStore, directory: Path) -> None:
    """The store's director roots and mirror list into ``directory`` where they differ: what is signed next is
    signed under the newest root any host added (a rotation elsewhere) and names the mirrors set elsewhere.

    Each root this host lacks is taken only as the next link of its chain: version N+1 signed by the threshold of
    root N and by its own (as devices check it); another root under a version this host has, a name that is no
    root's, or bytes that are no root are ``UntrustedDirectorRoot``, and nothing is written. A host with no root
    yet takes the store's first as given (the store is then its only source)."""
    directory.mkdir(parents=True, exist_ok=True)
    stored = store.director_files(DIRECTOR)
    mirrors = stored.get(MIRRORS_FILE)
    roots = sorted(((int(n.split(".", 1)[0]), b) for n, b in stored.items() if ROOT_NAME.fullmatch(n)), key=lambda r: r[0])
    previous: tuple[int, bytes] | None = None  # the last root of the chain so far (parsed only to check a new one)
    for version, body in roots:
        name = f"{version}.root.json"
        here = _read(directory / name)
        if here is None:
            _next_root(None if previous is None else _load_root(*previous), version, body)
            atomic_write(directory / name, body)
        elif here != body:
            raise UntrustedDirectorRoot(f"the store's {name} is not the one this host has in {directory}")
        previous = (version, body)
    if mirrors is not None and _read(directory / MIRRORS_FILE) != mirrors:
        atomic_write(directory / MIRRORS_FILE, mirrors)


def _load_root(version: int, body: bytes) -> Metadata[Root]:
    name = f"{version}.root.json"
    try:
        md: Metadata[Root] = Metadata.from_bytes(body)
    except Exception as exc:  # python-tuf raises several types for bytes that are no metadata
        raise UntrustedDirectorRoot(f"the store's {name} is no root: {type(exc).__name__}: {exc}") from exc
    if not isinstance(md.signed, Root) or md.signed.version != version:
        raise UntrustedDirectorRoot(f"the store's {name} is no root of that version")
    return md


def _next_root(previous: Metadata[Root] | None, version: int, body: bytes) -> Metadata[Root]:
    """``body`` as root ``version``, checked as the link after ``previous`` (None: the first this host takes)."""
    md = _load_root(version, body)
    if previous is None:
        return md
    try:
        verify_next_root(previous, md)
    except Exception as exc:  # BadVersionNumberError, UnsignedMetadataError and friends: not the next link
        raise UntrustedDirectorRoot(f"the store's {version}.root.json is not the root after {previous.signed.version}: {exc}") from exc
    return md


FileVersions = dict[str, tuple[tuple[int, int, int], int]]
"""Per device: its timestamp file's (inode, size, mtime in ns) when last read, and the version read then."""


def sync(store: DirectorStore, directory: Path, devices: list[str], seen: FileVersions | None = None) -> Synced:
    """The director's roots and mirror list level (the store's into the directory, then the directory's into the
    store), and each of ``devices`` (those the directory holds) whose files are newer than the store's copy pushed
    there, ``SYNC_BATCH`` devices a transaction. ``seen``: the timestamp versions read by earlier rounds, kept by the
    caller; a file whose inode, size and mtime are unchanged is not read again (a controller syncs every round,
    and 10,000 leftover device directories cost it a second of reading a minute). Hold the repository's lock."""
    pull_director(store, directory)
    devices = [d for d in devices if _device_id(d)]
    stored = store.director_versions_of(devices)
    pushed = 0
    here = _versions_here(directory, devices, {} if seen is None else seen)
    newer_here = [(d, directory / d / "metadata") for d in devices if here[d] > stored.get(d, 0)]
    behind = sum(1 for d in devices if 0 < here[d] < stored.get(d, 0))
    for i in range(0, len(newer_here), SYNC_BATCH):  # a first lead over 10,000 devices' files: 50 transactions, not 10,000
        sets = [(device, local_files(meta)) for device, meta in newer_here[i : i + SYNC_BATCH]]
        whole = [(device, files) for device, files in sets if TIMESTAMP in files]
        pushed += len(whole) - len(push_devices(store, whole))
    push_director(store, directory)
    return Synced(pushed, behind)


SYNC_BATCH = 200  # devices' sets pushed in one transaction by ``sync``


def _versions_here(directory: Path, devices: list[str], seen: FileVersions) -> dict[str, int]:
    """Each device's timestamp version in the directory (0: none), read only where the file changed since ``seen``
    (which is brought up to date). Commits replace the file (a new inode), so a rewrite is never mistaken for the same."""
    here = {}
    for device in devices:
        path = directory / device / "metadata" / TIMESTAMP
        try:
            st = path.stat()
        except FileNotFoundError:
            seen.pop(device, None)
            here[device] = 0
            continue
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        known = seen.get(device)
        if known is None or known[0] != key:
            known = seen[device] = (key, _version(_read(path)))
        here[device] = known[1]
    for gone in set(seen) - set(devices):
        del seen[gone]
    return here
