"""The controller's store: devices, telemetry, rollouts — in SQLite (a file) or PostgreSQL (a URL), behind this one class.

Why one class: everything the controller knows goes through ``FleetStore``'s methods, so a fleet that outgrows one
machine names a ``postgresql://`` URL instead of a path and nothing else changes. It owns the lock and the
transactions, and composes the tables' modules, which own the records: ``schema`` (tables as data, versions),
``devices`` (registry, jobs), ``telemetry`` (batches in, rows and aggregates out), ``rollouts``; the dialect modules
say what only their engine says (``sql``: SQLite; ``pg``: PostgreSQL, imported only for a URL), both behind
``db.Database``. Telemetry arrives in batches and is written one transaction per batch, never per message, each
table's rows in one bulk write (COPY on PostgreSQL): 10,000+ messages/s on a Pi-class disk needs that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent import wire
from fleet.store import aggregates, schema, sql
from fleet.store import devices as registry
from fleet.store.db import Database
from fleet.store.devices import Device, Devices, Job
from fleet.store.director import DirectorFiles, DirectorRootChanged, DirectorSet, StaleDirectorMetadata
from fleet.store.rollouts import DeviceChange, PlannedDevice, Rollout, RolloutDevice, Rollouts
from fleet.store.telemetry import Distribution, Health, PredictionRow, ShadowHealth, Telemetry, TelemetryRow
from fleet.store.url import BadStoreURL, StoreLocation, StoreUnreachable, is_postgres, store_location
from fleet.store.windows import Window, WindowPredictions, WindowTelemetry, window_predictions, window_telemetry

__all__ = [
    "BadStoreURL",
    "Device",
    "DeviceChange",
    "DirectorSet",
    "Distribution",
    "FleetStore",
    "Health",
    "Job",
    "PlannedDevice",
    "PredictionRow",
    "Rollout",
    "RolloutDevice",
    "ShadowHealth",
    "StaleDirectorMetadata",
    "DirectorRootChanged",
    "StoreLocation",
    "StoreUnreachable",
    "TelemetryRow",
    "Window",
    "WindowPredictions",
    "WindowTelemetry",
    "open_database",
]

Batch = tuple[str, wire.TelemetryBatch, float]


def open_database(location: str | Path) -> Database:
    """The dialect ``location`` names: a ``postgresql://`` URL (``BadStoreURL`` when malformed, ``StoreUnreachable``
    when the server does not answer) or a SQLite file's path. The schema is not touched (``schema.upgrade`` does)."""
    location = store_location(location)
    if is_postgres(location):
        from fleet.store.pg import PostgreSQL

        return PostgreSQL(str(location))
    return sql.SQLite(Path(location))


class FleetStore:
    def __init__(self, location: str | Path) -> None:
        """``location``: a SQLite file's path or a ``postgresql://`` URL; the schema is brought up to date on opening."""
        self.db = open_database(location)
        self.name = self.db.name  # a URL's password left out: what messages may show
        self._lock = self.db.serial  # SQLite: one thread at a time; PostgreSQL: calls run side by side
        # the ingest reads a device's registry record, changes it and writes it back: one flush at a time in this
        # process (its own session's and an adopted one's), so neither writes over the other's newer word
        self._registry = threading.RLock()
        self.duplicates = 0  # telemetry batches received again (same device, session, seq) and not stored twice
        self.rejected = 0  # messages the store could not take (the wire let them through): skipped, counted
        self.stale_reports = 0  # a replayed ``reported`` older than the one held, of the same run: not taken
        self.last_rejection = ""
        self.newer_runs = 0  # devices put online by telemetry of a run before its ``ready`` reached the registry (lost, or late)
        # each device's run as this store last read or wrote it: a hint that keeps the registry out of the telemetry
        # path (a batch of a run not newer than this needs no look), never the truth (another controller may be ahead)
        self._sessions: dict[str, int] = {}
        self._devices, self._telemetry, self._rollouts = Devices(self.db), Telemetry(self.db), Rollouts(self.db)
        self._director = DirectorFiles(self.db)
        from fleet.leader import running_controllers  # here: fleet.leader imports this package's url module

        try:
            # another process may be creating the SQLite schema right now; an upgrade waits for no older controller
            sql.retry_locked(lambda: schema.upgrade(self.db, running=lambda ids: running_controllers(location, ids, self.db)))
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    # -- ingest: one transaction per batch ------------------------------------------------

    def ingest(self, messages: Iterable[tuple[str, wire.WireModel, float]], replayed: Collection[int] = ()) -> int:
        """(device, decoded message, receive time) — decoded by ``wire.decode_device_message``; returns how many were stored.

        One transaction for the batch. A telemetry batch already stored (same device, session and
        seq: re-sent after a lost acknowledgement) is counted in ``duplicates`` and not stored again.
        ``replayed``: the positions in ``messages`` of messages the broker replayed (retained at a subscription, or
        sent again after a reconnect), not sent live; such a ``reported`` older than the one a device's record holds
        (of an earlier run of its agent, or of the same run and older by its clock) is counted in ``stale_reports``
        and not taken (``devices.stale_replay``).
        The devices the batch's status and reports touch are locked first (PostgreSQL, ``Devices.lock``): another
        controller writing the same record meanwhile is waited for and read, never written over.
        """
        items = list(messages)
        batches: list[Batch] = [(d, m, r) for d, m, r in items if isinstance(m, wire.TelemetryBatch)]
        with self._registry, self._lock:
            self.db.ensure_partitions([r for _, _, r in batches])
            with self.db.transaction():
                stored = self._add_batches(batches)
                n, duplicates = stored.count(True), stored.count(False)
                changed: dict[str, Device] = {}  # the registry's records this batch changed, written once each
                runs = self._runs_to_check(batches, stored, items)
                self._devices.lock([*(d for d, m, _ in items if isinstance(m, (wire.Status, wire.Reported))), *runs])
                newer, seen = self._newer_runs(changed, runs)  # first: a report in this flush then belongs to the new run
                stale = 0
                for i, (device, message, received) in enumerate(items):
                    if isinstance(message, wire.TelemetryBatch):
                        continue
                    try:
                        with self.db.savepoint():
                            outcome = self._one(changed, device, message, received, replay=i in replayed)
                    except self.db.record_errors as exc:  # one message's trouble is not the batch's
                        self._reject(device, exc)
                        continue
                    n += outcome == "stored"
                    stale += outcome == "stale"
                for d in changed.values():
                    self._devices.write(d)
                self._telemetry.add_totals(b for (_, b, _), ok in zip(batches, stored) if ok)
            self.duplicates += duplicates  # counted once the transaction holds
            self.stale_reports += stale
            self.newer_runs += newer
            self._sessions.update(seen)  # once the transaction holds: a rolled-back flush teaches the hint nothing
            self._sessions.update((d.id, d.session) for d in changed.values())
        return n

    def _runs_to_check(
        self, batches: Sequence[Batch], stored: Sequence[bool | None], items: Sequence[tuple[str, wire.WireModel, float]]
    ) -> dict[str, tuple[int, float]]:
        """The devices whose stored telemetry names a run newer than this store last knew them on and than any status
        of theirs in this flush (which says it itself): (run, received)."""
        runs: dict[str, tuple[int, float]] = {}
        known, said = self._sessions, dict[str, int]()
        for device, message, _ in items:
            if isinstance(message, wire.Status) and message.session > said.get(device, -1):
                said[device] = message.session
        for (device, batch, received), ok in zip(batches, stored):
            session = batch.session
            if ok and session > known.get(device, -1) and session > said.get(device, -1) and session > runs.get(device, (-1, 0.0))[0]:
                runs[device] = (session, received)
        return runs

    def _newer_runs(self, changed: dict[str, Device], runs: Mapping[str, tuple[int, float]]) -> tuple[int, dict[str, int]]:
        """Before the batch's status and reports (which then have the last word, a will included): each device whose
        telemetry names a run newer than its record's is online on that run (``heard_from_newer_run``, into
        ``changed``). How many were, and the runs of the records that were not newer (for the hint). One read."""
        newer, seen = 0, {}
        records = {d.id: d for d in self._devices.some(runs)} if runs else {}
        for device, (session, received) in runs.items():
            d = records.get(device) or Device(device)
            if registry.heard_from_newer_run(d, session, received):
                changed[device] = d
                newer += 1
            else:
                seen[device] = d.session
        return newer, seen

    def _add_batches(self, batches: Sequence[Batch]) -> list[bool | None]:
        """Every batch in one go; when that fails on a record, each alone, so only the bad one is refused (None)."""
        try:
            with self.db.savepoint():
                return list(self._telemetry.add_batches(batches))
        except self.db.record_errors:
            pass
        out: list[bool | None] = []
        for one in batches:
            try:
                with self.db.savepoint():
                    out += self._telemetry.add_batches([one])
            except self.db.record_errors as exc:
                self._reject(one[0], exc)
                out.append(None)
        return out

    def _reject(self, device: str, exc: Exception) -> None:
        self.rejected += 1
        self.last_rejection = f"{device}: {type(exc).__name__}: {exc}"[:300]

    def _one(self, changed: dict[str, Device], device: str, message: wire.WireModel, received: float, replay: bool) -> str:
        """One message into the store: "stored", "stale" (a replayed older report) or "unchanged" (a late will)."""
        if isinstance(message, (wire.JobUpdate, wire.UpdateCheck)):
            self._devices.write_job(device, message, received)
            return "stored"
        d = changed.get(device) or self._devices.get(device) or Device(device)
        if replay and isinstance(message, wire.Reported) and registry.stale_replay(d, message):
            return "stale"
        if not registry.apply(d, message, received):
            return "unchanged"
        changed[device] = d
        return "stored"

    def prune_telemetry(self, keep_s: float) -> int:
        """Telemetry received more than ``keep_s`` ago goes (PostgreSQL: whole days' partitions are dropped); how many
        telemetry rows went. The controller calls it every round."""
        with self._lock:
            return self._telemetry.prune(keep_s)

    # -- devices ------------------------------------------------------------------------------

    def device(self, device_id: str) -> Device | None:
        with self._lock:
            return self._devices.get(device_id)

    def devices(self) -> list[Device]:
        with self._lock:
            return self._devices.all()

    def tag(self, device_id: str, tags: dict[str, str]) -> Device:
        """Set tags (an empty value removes the key); the device need not have reported yet."""
        with self._lock:
            self._devices.set_tags(device_id, tags)
            return self._devices.get(device_id) or Device(device_id)

    def jobs(self, device: str) -> list[Job]:
        with self._lock:
            return self._devices.jobs(device)

    def last_job(self, device: str, target: str) -> Job | None:
        with self._lock:
            return self._devices.last_job(device, target)

    def last_jobs(self, wanted: Mapping[str, str]) -> dict[str, Job]:
        """``last_job`` of many devices at once: ``wanted`` maps a device to its target; one query per chunk of devices."""
        with self._lock:
            return self._devices.last_jobs(wanted)

    def devices_of(self, ids: Iterable[str]) -> list[Device]:
        """The registry's records of ``ids`` (those it has): a rollout's wave, not the whole fleet."""
        with self._lock:
            return self._devices.some(ids)

    # -- telemetry ----------------------------------------------------------------------------

    def recent_telemetry(self, device: str, limit: int = 20) -> list[dict[str, Any]]:
        with self._lock:
            return self._telemetry.recent(device, limit)

    def telemetry_count(self) -> int:
        with self._lock:
            return self._telemetry.count()

    def telemetry_rows(self, model: str, devices: Iterable[str], since: float) -> list[TelemetryRow]:
        """Every telemetry row of ``model`` on these devices since ``since`` (receive time), any version: the gates' input."""
        with self._lock:
            return self._telemetry.telemetry_rows(model, devices, since)

    def last_reports(self, model: str, version: str, devices: Iterable[str], since: float, until: float) -> dict[str, float]:
        """Per device: when its newest telemetry on ``model`` ``version`` in ``[since, until)`` arrived (none: left out)."""
        with self._lock:
            return self._telemetry.last_reports(model, version, devices, since, until)

    def window_telemetry(self, model: str, windows: Sequence[Window]) -> dict[Window, WindowTelemetry]:
        """Each window's telemetry of ``model`` summed in the database (windows without any left out): the health gate's
        input, one row per window instead of every row of every device."""
        with self._lock:
            return window_telemetry(self.db, model, windows)

    def window_predictions(self, model: str, windows: Sequence[Window]) -> dict[Window, WindowPredictions]:
        """Each window's prediction sums of ``model`` (windows without any left out)."""
        with self._lock:
            return window_predictions(self.db, model, windows)

    def prediction_rows(self, model: str, devices: Iterable[str], since: float) -> list[PredictionRow]:
        """Every prediction-sum row of ``model`` on these devices since ``since``, any version."""
        with self._lock:
            return self._telemetry.prediction_rows(model, devices, since)

    def health(self, model: str, version: str, since: float, devices: Iterable[str] | None = None) -> Health:
        """The model version's requests, errors and p95 since ``since`` (optionally on these devices only)."""
        with self._lock:
            return self._telemetry.health(model, version, since, devices)

    def distribution(self, model: str, version: str, since: float, devices: Iterable[str] | None = None) -> Distribution:
        """What ``version`` answered since ``since`` (optionally on these devices only), from the devices' prediction sums."""
        with self._lock:
            return self._telemetry.distribution(model, version, since, devices)

    def shadow_health(self, model: str, shadow_version: str, since: float, devices: Iterable[str] | None = None) -> ShadowHealth:
        """How ``shadow_version``, run in shadow, agreed with the serving version since ``since``."""
        with self._lock:
            return self._telemetry.shadow_health(model, shadow_version, since, devices)

    def series(self, since: float, bucket_s: float = 10.0) -> list[dict[str, Any]]:
        """Per model version and time bucket: requests, error rate, median p95 (the dashboard's charts)."""
        with self._lock:
            return self._telemetry.series(since, bucket_s)

    # -- aggregates for /metrics (fleet.metrics) ---------------------------------------------

    def telemetry_totals(self) -> dict[tuple[str, str], aggregates.VersionTotals]:
        """Per model version: every call answered, server and client error the stored telemetry counted."""
        with self._lock:
            return aggregates.telemetry_totals(self.db)

    def fleet_aggregates(self, p95_since: float) -> aggregates.FleetAggregates:
        """Devices by online state and hardware, each version's p95 since ``p95_since``, rollouts, waves, gate decisions."""
        with self._lock:
            return aggregates.fleet_aggregates(self.db, p95_since)

    # -- rollouts -----------------------------------------------------------------------------

    def create_rollout(self, spec: dict[str, Any], waves: list[list[PlannedDevice]], phase: str = "") -> int:
        """A rollout and its devices, in one transaction. ``phase`` "shadow": the first wave runs the new version in
        shadow before any device switches."""
        with self._lock, self.db.transaction():
            return self._rollouts.create(spec, waves, phase)

    def rollout(self, rid: int) -> Rollout | None:
        with self._lock:
            return self._rollouts.get(rid)

    def rollouts(self) -> list[Rollout]:
        with self._lock:
            return self._rollouts.all()

    def update_rollout(self, rid: int, only_if: Sequence[str] = (), **fields: Any) -> bool:
        """Set ``fields`` of rollout ``rid``; with ``only_if``, only while its state is one of those (checked by the
        UPDATE itself: an operator's pause or abort from another process between our read and our write wins).
        Whether the rollout was changed."""
        with self._lock:
            return self._rollouts.update(rid, fields, only_if)

    def rollout_devices(self, rid: int, wave: int | None = None) -> list[RolloutDevice]:
        with self._lock:
            return self._rollouts.devices(rid, wave)

    def set_device_states(self, rid: int, changes: list[DeviceChange]) -> None:
        """Many devices' states in one transaction."""
        if not changes:
            return
        with self._lock, self.db.transaction():
            self._rollouts.set_states(rid, changes)

    # -- the director's metadata (``fleet.store.director``) ------------------------------------

    def director_file(self, device: str, name: str) -> bytes | None:
        """One file of ``device``'s director repository (device "": the director's own roots and mirrors.json)."""
        with self._lock:
            return self._director.file(device, name)

    def director_files(self, device: str) -> dict[str, bytes]:
        with self._lock:
            return self._director.files(device)

    def director_versions(self) -> dict[str, int]:
        """Each device's committed director timestamp version, as the store has it."""
        with self._lock:
            return self._director.versions()

    def put_director_files(self, device: str, files: dict[str, bytes], timestamp_version: int) -> None:
        """``device``'s whole director set in one transaction; ``StaleDirectorMetadata`` when the store's is newer."""
        with self._lock, self.db.transaction():
            self._director.replace(device, files, timestamp_version)

    def director_versions_of(self, devices: Sequence[str]) -> dict[str, int]:
        """The committed director timestamp version of each of ``devices`` the store has (a batch's check, one query)."""
        with self._lock:
            return self._director.versions_of(devices)

    def director_listing(self, devices: Sequence[str]) -> dict[str, dict[str, int]]:
        """Each of ``devices``' director files the store has, name: version (what the next versions are signed from)."""
        with self._lock:
            return self._director.listing(devices)

    def director_timestamps(self, devices: Sequence[str]) -> dict[str, bytes]:
        """The committed director ``timestamp.json`` of each of ``devices`` the store has."""
        with self._lock:
            return self._director.timestamps(devices)

    def put_director_sets(self, sets: Sequence[DirectorSet]) -> None:
        """Many devices' director commits in one transaction: all or none (``StaleDirectorMetadata`` when the store
        has a newer one of any)."""
        with self._lock, self.db.transaction():
            self._director.replace_many(sets)

    def add_director_files(self, device: str, files: dict[str, bytes]) -> None:
        """Files kept beside a device's set (the director's roots and mirrors.json under device "")."""
        with self._lock, self.db.transaction():
            self._director.add(device, files)

    # -- controllers (``fleet.transport.adopt``) ------------------------------------------------

    def register_controller(self, controller_id: str, client_id: str, host: str) -> None:
        with self._lock:
            self.db.insert("controllers", {"id": controller_id, "client_id": client_id, "host": host, "started": time.time()}, "replace")

    def forget_controller(self, controller_id: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM controllers WHERE id = ?", [controller_id])

    def controllers(self) -> list[dict[str, Any]]:
        """Every registered controller: id, ingest client id, host, start time."""
        with self._lock:
            return self.db.query("SELECT id, client_id, host, started FROM controllers ORDER BY id")
