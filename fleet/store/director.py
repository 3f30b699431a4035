"""The director's signed metadata in the store: every controller serves it from here, the leader writes it.

Why in the store: the director signs on one controller (the leader, which holds the keys), but any controller may
answer a device's repository request (MQTT 5 shared subscription), and another controller on another machine
leads when the leader dies. Files under one controller's ROOT reach neither; the store reaches both. One row per
file of a device's director repository (``N.root.json``, ``N.targets.json``, ``N.snapshot.json``, ``timestamp.json``),
device "" for the director's own roots and ``mirrors.json``. A device's files are replaced as one set in one
transaction, so a reader sees the old assignment or the new one; the timestamp's version only goes up (a writer
whose copy is behind the store's is refused: ``StaleDirectorMetadata``), so two writers never publish the same
version with different contents. Nothing here locks or opens transactions: ``FleetStore`` does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.errors import EdgefleetError
from fleet.store.db import Database

__all__ = ["DIRECTOR", "TIMESTAMP", "DirectorFiles", "DirectorRootChanged", "DirectorSet", "StaleDirectorMetadata", "file_version"]

TIMESTAMP = "timestamp.json"
DIRECTOR = ""  # the "device" under which the director's own files (roots, mirrors.json) are kept


class StaleDirectorMetadata(EdgefleetError):
    """A device's director metadata was signed from a copy older than the store's: publishing it would go back."""

    code = "stale_director_metadata"


class DirectorRootChanged(StaleDirectorMetadata):
    """A device's director metadata was signed under a root older than the store's newest (a key rotation landed
    since): its signatures may be by a retired key, so it is signed again under the new root (or not at all)."""

    code = "director_root_changed"


ROOTS_LOCK = 0x65646765_726F6F74  # "edgeroot": commits take it shared, a new director root exclusive (PostgreSQL)


def file_version(name: str) -> int:
    """The version a numbered metadata file's name carries (``3.targets.json``: 3); 0 for any other."""
    head = name.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


@dataclass(frozen=True)
class DirectorSet:
    """One commit of a device's director repository: ``files`` added (its new ``timestamp.json`` among them, at
    ``version``) and ``drop``, the stored names it prunes; ``drop`` None: a whole set, as a directory holds it (the
    stored names it lacks go). Roots are never dropped: one added beside the set since (a rotation) must stay.
    Numbered files never change content: one stored under the same name with other bytes refuses the commit.
    ``root``: the director root version it was signed under (0: not checked — files pushed as a directory holds them)."""

    device: str
    files: Mapping[str, bytes]
    version: int
    drop: frozenset[str] | None = None
    root: int = 0

    def dropped(self, stored: set[str]) -> list[str]:
        gone = stored - set(self.files) if self.drop is None else stored & self.drop
        return sorted(n for n in gone if not n.endswith(".root.json"))


class DirectorFiles:
    def __init__(self, db: Database) -> None:
        self.db = db

    def file(self, device: str, name: str) -> bytes | None:
        rows = self.db.query("SELECT body FROM director_metadata WHERE device = ? AND name = ?", [device, name])
        return bytes(rows[0]["body"]) if rows else None

    def files(self, device: str) -> dict[str, bytes]:
        rows = self.db.query("SELECT name, body FROM director_metadata WHERE device = ?", [device])
        return {r["name"]: bytes(r["body"]) for r in rows}

    def versions(self) -> dict[str, int]:
        """Each device's committed timestamp version (devices with metadata in the store)."""
        rows = self.db.query("SELECT device, version FROM director_metadata WHERE name = ?", [TIMESTAMP])
        return {r["device"]: int(r["version"]) for r in rows}

    def versions_of(self, devices: Sequence[str]) -> dict[str, int]:
        """The committed timestamp version of each of ``devices`` the store has (one query per chunk of ids)."""
        out: dict[str, int] = {}
        for part in self.db.chunks(sorted(set(devices))):
            where, args = self.db.in_list("device", part)
            rows = self.db.query(f"SELECT device, version FROM director_metadata WHERE name = ? AND {where}", [TIMESTAMP, *args])
            out.update({r["device"]: int(r["version"]) for r in rows})
        return out

    def listing(self, devices: Sequence[str]) -> dict[str, dict[str, int]]:
        """Of each of ``devices`` the store has: its files' names and versions (a numbered file's number, the
        timestamp's ``signed.version``): what a writer signs the next versions from (one query per chunk of ids)."""
        out: dict[str, dict[str, int]] = {}
        for part in self.db.chunks(sorted(set(devices))):
            where, args = self.db.in_list("device", part)
            for r in self.db.query(f"SELECT device, name, version FROM director_metadata WHERE {where}", args):
                out.setdefault(r["device"], {})[r["name"]] = int(r["version"])
        return out

    def timestamps(self, devices: Sequence[str]) -> dict[str, bytes]:
        """The committed ``timestamp.json`` of each of ``devices`` the store has (one query per chunk of ids)."""
        out: dict[str, bytes] = {}
        for part in self.db.chunks(sorted(set(devices))):
            where, args = self.db.in_list("device", part)
            rows = self.db.query(f"SELECT device, body FROM director_metadata WHERE name = ? AND {where}", [TIMESTAMP, *args])
            out.update({r["device"]: bytes(r["body"]) for r in rows})
        return out

    def replace(self, device: str, files: Mapping[str, bytes], timestamp_version: int) -> None:
        """``device``'s whole set (``files``, its timestamp at ``timestamp_version``): the timestamp moves up first (a
        compare-and-set: ``StaleDirectorMetadata`` when the store's is not older, unless the bytes are the same), then
        the numbered files it names are added and those no longer in the set deleted. Call in a transaction."""
        self.replace_many([DirectorSet(device, files, timestamp_version)])

    def replace_many(self, sets: Sequence[DirectorSet]) -> None:
        """``replace`` for many devices: the compare-and-set a chunk of devices at a time, the names stored read in one
        query, a name stored already compared by its bytes, the new files added in one bulk insert and the dropped ones
        deleted per device. Call in a transaction."""
        now = time.time()
        self._same_root([d for d in sets if d.root])
        self._move_timestamps(sets, now)
        stored: dict[str, set[str]] = {}
        for part in self.db.chunks(sorted({d.device for d in sets})):
            where, args = self.db.in_list("device", part)
            for r in self.db.query(f"SELECT device, name FROM director_metadata WHERE {where}", args):
                stored.setdefault(r["device"], set()).add(r["name"])
        self._same_bytes([d for d in sets if any(n != TIMESTAMP and n in stored.get(d.device, ()) for n in d.files)])
        new = []
        for d in sets:
            have = stored.get(d.device, set())
            new += [_row(d.device, n, b, now) for n, b in d.files.items() if n != TIMESTAMP and n not in have]
            gone = d.dropped(have)
            if gone:
                where, args = self.db.in_list("name", gone)
                self.db.execute(f"DELETE FROM director_metadata WHERE device = ? AND {where}", [d.device, *args])
        self.db.insert_new("director_metadata", new)

    def _same_root(self, sets: Sequence[DirectorSet]) -> None:
        """Every set was signed under the newest director root in the store, else ``DirectorRootChanged``.

        Why here: a controller whose keys a rotation on another host retired learns of the new root only from the
        store; a batch it signed just before must not land after the rotation's re-signing. On PostgreSQL the
        newest root is read under the roots lock, shared (a new root takes it exclusive, ``add``), so a root
        committed while this transaction runs is either seen here or waits for it — and then the rotation's
        re-signing starts from this commit. SQLite's write transactions are one at a time already."""
        if not sets:
            return
        if self.db.dialect == "postgresql":
            self.db.execute("SELECT pg_advisory_xact_lock_shared(?)", [ROOTS_LOCK])
        newest = self.newest_root()
        for d in sets:
            if d.root < newest:
                raise DirectorRootChanged(f"director metadata of {d.device} was signed under root {d.root}; the store has root {newest}")

    def newest_root(self) -> int:
        """The newest director root's version in the store (0: none yet)."""
        rows = self.db.query("SELECT MAX(version) AS v FROM director_metadata WHERE device = ? AND name LIKE ?", [DIRECTOR, "%.root.json"])
        return int(rows[0]["v"] or 0) if rows else 0

    def _same_bytes(self, sets: Sequence[DirectorSet]) -> None:
        """Each file of ``sets`` the store holds under the same name holds the same bytes (a set pushed again, older
        files re-sent with a new timestamp); else the set was signed from another history: ``StaleDirectorMetadata``.
        Two writers that sign the same versions in the same second also sign equal snapshots and timestamps over
        different targets: this is how the second learns that its targets were not stored."""
        for d in sets:
            stored = self.files(d.device)
            if any(n != TIMESTAMP and n in stored and stored[n] != b for n, b in d.files.items()):
                raise self._stale(d.device, d.version)

    def _move_timestamps(self, sets: Sequence[DirectorSet], now: float) -> None:
        """The compare-and-set, a chunk of devices per statement: each set's timestamp replaces the stored one when that
        is older (or there is none), or is the stored one byte for byte already (the same set again: ``_same_bytes``
        then checks what it names); any other is ``StaleDirectorMetadata``. The stored timestamps are read locked
        (PostgreSQL: ``FOR UPDATE``, in device order so that two batches cannot deadlock; SQLite's write transaction
        is one at a time), and a timestamp another writer inserted meanwhile is refused by its key."""
        lock = " FOR UPDATE" if self.db.dialect == "postgresql" else ""
        stored: dict[str, tuple[int, bytes]] = {}
        for part in self.db.chunks(sorted({d.device for d in sets})):
            where, args = self.db.in_list("device", part)
            sql = f"SELECT device, version, body FROM director_metadata WHERE name = ? AND {where} ORDER BY device{lock}"
            rows = self.db.query(sql, [TIMESTAMP, *args])
            stored.update({r["device"]: (int(r["version"]), bytes(r["body"])) for r in rows})
        moving = []
        for d in sets:
            have = stored.get(d.device)
            if have is None or have[0] < d.version:
                moving.append(d)
            elif have[1] != d.files[TIMESTAMP]:
                raise self._stale(d.device, d.version)
        for part in self.db.chunks(sorted({d.device for d in moving if d.device in stored})):
            where, args = self.db.in_list("device", part)
            self.db.execute(f"DELETE FROM director_metadata WHERE name = ? AND {where}", [TIMESTAMP, *args])
        taken = self.db.insert_new("director_metadata", [_row(d.device, TIMESTAMP, d.files[TIMESTAMP], now, d.version) for d in moving])
        for d, new in zip(moving, taken, strict=True):
            if not new:
                raise self._stale(d.device, d.version)

    def _stale(self, device: str, version: int) -> StaleDirectorMetadata:
        theirs = self.versions_of([device]).get(device, 0)
        return StaleDirectorMetadata(f"director metadata of {device}: the store has timestamp version {theirs}, this copy {version}")

    def add(self, device: str, files: Mapping[str, bytes]) -> None:
        """Files of ``device`` written as given (the director's roots and mirrors.json). A root stored under the same
        name with other bytes is ``StaleDirectorMetadata`` (two rotations from the same root: devices must never see
        two roots of one version). Call in a transaction: on PostgreSQL a director root takes the roots lock
        exclusive, so it waits for the commits signed under the root before it (``_same_root``)."""
        roots = {n: b for n, b in files.items() if n.endswith(".root.json")}
        if roots and device == DIRECTOR and self.db.dialect == "postgresql" and self._new_roots(device, roots):
            self.db.execute("SELECT pg_advisory_xact_lock(?)", [ROOTS_LOCK])  # only for a root not stored yet
        new = self._new_roots(device, roots)
        others = {n: b for n, b in files.items() if n not in roots}
        self._write(device, {**new, **{n: b for n, b in others.items() if self.file(device, n) != b}}, time.time())

    def _new_roots(self, device: str, roots: Mapping[str, bytes]) -> dict[str, bytes]:
        """The roots of ``roots`` not stored yet; one stored under the same name with other bytes is
        ``StaleDirectorMetadata`` (two rotations from the same root)."""
        new = {}
        for name, body in roots.items():
            stored = self.file(device, name)
            if stored is None:
                new[name] = body
            elif stored != body:
                raise StaleDirectorMetadata(f"{device or 'the director'} already has another {name}: a rotation made from an older root")
        return new

    def _write(self, device: str, files: Mapping[str, bytes], now: float) -> None:
        for name, body in files.items():
            self.db.insert("director_metadata", _row(device, name, body, now), "replace")


def _row(device: str, name: str, body: bytes, now: float, version: int | None = None) -> dict[str, object]:
    """A row of ``director_metadata``: a numbered file's version is the one its name carries."""
    return {"device": device, "name": name, "version": file_version(name) if version is None else version, "body": body, "updated": now}
