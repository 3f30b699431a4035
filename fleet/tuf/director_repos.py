"""Where the director's per-device repositories live: a directory on one box, or the store every controller shares.

Why two: a controller without a store (one box) keeps each device's repository under ``DIR/{device}/metadata``,
committed by the timestamp's rename; with a store the store *is* the repository — the leader signs into it, every
controller serves from it (``RepositoryServer(director_store=...)``), and nothing is written to files, which on a
busy disk cost more than the signing (three files created, synced and renamed a device). The ``Director`` decides
what to sign; a ``Repositories`` only says what a device's repository holds and commits what was signed, so the
trust logic is written once for both. A commit is all-or-nothing per device: on files the timestamp's rename, in the
store one transaction whose compare-and-set on the timestamp's version refuses a copy signed from an older state
(``StaleDirectorMetadata``), which is what keeps two writers on two machines from going back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.wire import valid_device_id
from fleet.store.director import DIRECTOR, TIMESTAMP, DirectorSet
from fleet.tuf.director_store import DirectorStore, put_sets
from fleet.tuf.metadata import commit_batch, prune_metadata, pruned_names, timestamp_version

__all__ = ["Commit", "FileRepositories", "Listing", "Repositories", "StoreRepositories"]


@dataclass(frozen=True)
class Listing:
    """What a device's repository holds: its files' names and its committed timestamp's version (0: none yet)."""

    names: frozenset[str] = frozenset()
    timestamp: int = 0


@dataclass(frozen=True)
class Commit:
    """One device's signed files (commit order, ``timestamp.json`` last), signed from ``before``; ``committed``: the
    targets and snapshot versions the new timestamp stands for (what pruning keeps below); ``root``: the version of
    the director root whose keys signed them (the store refuses the commit once a newer root is there)."""

    device: str
    before: Listing
    files: list[tuple[str, bytes]]
    committed: dict[str, int] = field(default_factory=dict)
    root: int = 0

    def pruned(self, keep: int) -> frozenset[str]:
        """The names this commit prunes, to ``keep`` versions of each role (``pruned_names`` over the names after it)."""
        names = set(self.before.names) | {name for name, _ in self.files}
        return frozenset(pruned_names(sorted(names), self.committed, keep))


class Repositories(Protocol):
    """Every device repository of one director."""

    def devices(self) -> list[str]: ...

    def listings(self, devices: Sequence[str]) -> dict[str, Listing]: ...

    def read(self, device: str, name: str) -> bytes | None: ...

    def timestamps(self, devices: Sequence[str]) -> dict[str, bytes]: ...

    def commit(self, commits: Sequence[Commit], keep: int) -> dict[str, Exception]: ...

    def add_root(self, name: str, body: bytes) -> None: ...


class FileRepositories:
    """One directory per device under the director's: the one box without a store."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def meta(self, device: str) -> Path:
        return self.directory / valid_device_id(device) / "metadata"

    def devices(self) -> list[str]:
        return sorted(p.parent.name for p in self.directory.glob("*/metadata"))

    def listings(self, devices: Sequence[str]) -> dict[str, Listing]:
        out = {}
        for device in devices:
            meta = self.meta(device)
            names = os.listdir(meta) if meta.is_dir() else []
            out[device] = Listing(frozenset(names), timestamp_version(meta / TIMESTAMP))
        return out

    def read(self, device: str, name: str) -> bytes | None:
        try:
            return (self.meta(device) / name).read_bytes()
        except FileNotFoundError:
            return None

    def timestamps(self, devices: Sequence[str]) -> dict[str, bytes]:
        return {d: body for d in devices if (body := self.read(d, TIMESTAMP)) is not None}

    def commit(self, commits: Sequence[Commit], keep: int) -> dict[str, Exception]:
        """Every device's files committed together (``commit_batch``: each timestamp renamed only after what it names
        is durable), then each pruned; an error while committing fails them all."""
        todo = [(self.meta(c.device), c) for c in commits]
        try:
            for meta, _ in todo:
                meta.mkdir(parents=True, exist_ok=True)
            commit_batch([(meta, c.files) for meta, c in todo if c.files])
        except OSError as exc:
            return {c.device: exc for c in commits}
        for meta, c in todo:
            prune_metadata(meta, c.committed, keep, sorted(set(c.before.names) | {n for n, _ in c.files}))
        return {}

    def add_root(self, name: str, body: bytes) -> None:
        from agent.files import atomic_write

        for meta in self.directory.glob("*/metadata"):
            atomic_write(meta / name, body)


class StoreRepositories:
    """Every device's repository as rows of the store (``fleet.store.director``): several controllers."""

    def __init__(self, store: DirectorStore) -> None:
        self.store = store

    def devices(self) -> list[str]:
        return sorted(d for d in self.store.director_versions() if d != DIRECTOR)

    def listings(self, devices: Sequence[str]) -> dict[str, Listing]:
        stored = self.store.director_listing(devices)
        return {d: Listing(frozenset(stored.get(d, {})), stored.get(d, {}).get(TIMESTAMP, 0)) for d in devices}

    def read(self, device: str, name: str) -> bytes | None:
        return self.store.director_file(valid_device_id(device), name)

    def timestamps(self, devices: Sequence[str]) -> dict[str, bytes]:
        return self.store.director_timestamps(devices)

    def commit(self, commits: Sequence[Commit], keep: int) -> dict[str, Exception]:
        """Every device's commit in one transaction; when that is refused (a device's store copy moved on since it
        was signed: ``StaleDirectorMetadata``), each alone, so only that one fails."""
        return put_sets(
            self.store,
            [DirectorSet(c.device, dict(c.files), _version(dict(c.files)[TIMESTAMP]), c.pruned(keep), c.root) for c in commits if c.files],
        )

    def add_root(self, name: str, body: bytes) -> None:
        for device in self.devices():
            self.store.add_director_files(device, {name: body})


def _version(body: bytes) -> int:
    return int(json.loads(body)["signed"]["version"])
