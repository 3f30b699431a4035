"""The device registry and the devices' install jobs: what each device last said about itself, as typed records.

Why apart from telemetry: the registry is small, read whole and rewritten per device; telemetry
is large and append-only. ``apply`` turns a device's status or reported message into its
``Device`` record without I/O, so what a message means is decided in one pure function.
Nothing here locks or opens transactions: ``FleetStore`` does, around these calls.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from agent import wire
from fleet.store import schema
from fleet.store.db import Database

__all__ = ["Device", "Devices", "Job", "apply"]


@dataclass
class Device:
    id: str
    online: bool = False
    session: int = 0
    last_seen: float = 0.0
    hardware: str = ""
    runtimes: dict[str, str] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {version, variant, runtime, ...}
    tags: dict[str, str] = field(default_factory=dict)
    update: dict[str, Any] = field(default_factory=dict)
    preferred_variants: list[str] = field(default_factory=list)  # what the device says it runs best, best first
    reported_ts: float = 0.0  # the held ``reported``'s own time (the device's clock): ``stale_replay``
    reported_session: int = 0  # the run the held ``reported`` names; from an agent naming none, the record's run then

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class Job:
    """A device's last word on one install job (``check``: its last update check), stamped with the receive time."""

    job: str
    target: str
    state: str
    reason: str
    ts: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_JSON_FIELDS = ("runtimes", "models", "tags", "update", "preferred_variants")


def _device(row: dict[str, Any]) -> Device:
    decoded = {name: json.loads(row[name] or "[]") if name == "preferred_variants" else json.loads(row[name]) for name in _JSON_FIELDS}
    d = Device(row["id"], bool(row["online"]), int(row["session"]), float(row["last_seen"]), row["hardware"], **decoded)
    d.reported_ts, d.reported_session = float(row.get("reported_ts") or 0.0), int(row.get("reported_session") or 0)
    return d


def _row(d: Device) -> dict[str, Any]:
    row = asdict(d)
    row["online"] = int(d.online)
    row.update({name: json.dumps(row[name]) for name in _JSON_FIELDS})
    return row


def stale_replay(d: Device, message: wire.Reported) -> bool:
    """``message``, a ``reported`` the broker replayed (retained, at a subscription; or a QoS 1 message sent again
    after a reconnect), is older than the one ``d`` holds: of an earlier run of the device's agent, or of the same
    run and older by the device's own clock.

    Why: a controller subscribes again on every reconnect (on a cluster, to another node), and the broker then hands
    it every retained message again; a node behind on a device's newest ``reported`` hands out an older one, which,
    written over the newer, would name a version the device left until it reports again — which a device that is
    done may never do. Only replays are judged, by the device's own clock (the two reports are the same device's),
    and only within one run of its agent (one status ``session``): a report that arrives live is what the device
    says now and is always taken, and so is a replay once the device has started again (a Pi rebooted or reflashed
    with its clock behind: its newest report can reach a controller that was away only as a replay).

    A report names its run (``session``, agents since 2026-12-05): then (run, clock) decides, so a later run's report
    replayed before that run's status is taken, and an earlier run's replayed after a later run's is refused whatever
    its clock says. A report that names none (an earlier agent) is judged as before: against the record's run, so
    such a report replayed before its run's status is refused until the device's next one."""
    if message.session is not None:
        return (message.session, message.ts) < (d.reported_session, d.reported_ts)
    # ``>=``: the held report may name a run the record's status has not reached yet (it came first); a report that
    # names none is older than that one when its clock says so, as within one run.
    return d.reported_session >= d.session and message.ts < d.reported_ts


def apply(d: Device, message: wire.WireModel, received: float) -> bool:
    """``message`` (a status or reported) into ``d``; False when it says nothing new (a late will of an earlier session)."""
    if isinstance(message, wire.Status):
        if message.state == "lost" and message.session < d.session:
            return False  # a late will of an earlier session: the device is back already
        d.session = max(d.session, message.session)
        d.online = message.state == "ready"
    elif isinstance(message, wire.Reported):
        d.reported_ts, d.reported_session = message.ts, d.session if message.session is None else message.session
        d.hardware, d.runtimes = message.hardware, dict(message.runtimes)
        d.models = {name: m.model_dump(exclude_none=True) for name, m in message.models.items()}
        d.update = message.update.model_dump(exclude_none=True) if message.update else {}
        d.preferred_variants = list(message.preferred_variants)
    else:
        raise TypeError(f"not a device message: {type(message).__name__}")
    d.last_seen = received
    return True


def heard_from_newer_run(d: Device, session: int, received: float) -> bool:
    """A telemetry batch of ``session``, a run newer than the record's: the device is up on a run whose ``ready`` the
    registry never got, so ``d`` becomes online on it. Seen on a 3-node NATS cluster: a device's ``ready``, published
    as the controller's subscription was being made on another node, reached neither the subscription nor its
    retained replay; the record stayed offline, with its models, for good, and a rollout never assigned the device.
    The run's will, when it goes, names this run and is taken (``apply``); a batch of the record's own run or an
    older one changes nothing (it may have been sent before that run's will). ``reported_session`` is left as it
    was: a report names its own run (``stale_replay``); one from an earlier agent that names none, stored before
    this while the record was on the earlier run, does not guard the new run against replays of older reports."""
    if session <= d.session:
        return False
    d.session, d.online, d.last_seen = session, True, received
    return True


_JOB_STEPS = ["IDLE", "DOWNLOADING", "VERIFYING", "STAGED", "HEALTH_CHECK"]
_JOB_ENDS = 6  # the rank of every end (ACTIVE, SHADOW, FAILED, REJECTED); ROLLED_BACK is 7


def _job_rank(column: str) -> str:
    """SQL for a job state's place in the update machine (agent/update/jobs.py): ends after every step, a rollback last."""
    steps = " ".join(f"WHEN '{state}' THEN {rank}" for rank, state in enumerate(_JOB_STEPS))
    return f"(CASE {column} {steps} WHEN 'ROLLED_BACK' THEN {_JOB_ENDS + 1} ELSE {_JOB_ENDS} END)"


# the same SQL on SQLite (3.24+) and PostgreSQL: an update that would move the job back is left out, and so is one
# that repeats an end (a QoS 1 message sent again, a dead controller's session drained): its receive time would
# re-date a job that ended long ago, and a rollout judges a device by the job's end since its assignment
_FORWARD_ONLY_JOB = (
    "INSERT INTO jobs (device, job, target, state, reason, ts) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (device, job) DO UPDATE SET target = excluded.target, state = excluded.state, reason = excluded.reason, "
    f"ts = excluded.ts WHERE {_job_rank('excluded.state')} > {_job_rank('jobs.state')} "
    f"OR ({_job_rank('excluded.state')} = {_job_rank('jobs.state')} AND {_job_rank('jobs.state')} < {_JOB_ENDS})"
)


def _write_reported_sql() -> str:
    """An upsert of a device record that never writes over ``tags`` (the columns from the schema, so a column added
    there is written here too)."""
    columns = next(t.columns for t in schema.TABLES if t.name == "devices")
    names = ", ".join(f'"{c}"' for c in columns)
    values = ", ".join(f":{c}" for c in columns)
    kept = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c not in ("id", "tags"))
    return f"INSERT INTO devices ({names}) VALUES ({values}) ON CONFLICT (id) DO UPDATE SET {kept}"


_WRITE_REPORTED = _write_reported_sql()
# The first key of the two-key advisory locks on device records ("edev"); the store's other advisory locks (schema,
# roots, leader) use the one-bigint form, a key space PostgreSQL keeps apart from the two-key one.
DEVICE_LOCKS = 0x65646576


def device_lock_key(device_id: str) -> int:
    """A device's advisory lock key: 32 bits of a BLAKE2b hash of its id, the same in every controller (Python's own
    ``hash`` is salted per process). Two ids sharing a key only wait for each other."""
    return int.from_bytes(hashlib.blake2b(device_id.encode(), digest_size=4).digest(), "big", signed=True)


_TAG_TRIES = 100


def _retagged(current: dict[str, str], change: Mapping[str, str]) -> dict[str, str]:
    """``current`` with ``change`` applied: a value sets its key, an empty value removes it."""
    tags = {**current, **{k: v for k, v in change.items() if v != ""}}
    for k in [k for k, v in change.items() if v == ""]:
        tags.pop(k, None)
    return tags


class Devices:
    """The ``devices`` and ``jobs`` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, device_id: str) -> Device | None:
        rows = self.db.query("SELECT * FROM devices WHERE id = ?", [device_id])
        return _device(rows[0]) if rows else None

    def all(self) -> list[Device]:
        return [_device(row) for row in self.db.query("SELECT * FROM devices ORDER BY id")]

    def lock(self, device_ids: Iterable[str]) -> None:
        """PostgreSQL: hold a transaction-scoped advisory lock on each of these devices (``device_lock_key``, taken in
        key order, so that two batches cannot deadlock) until the transaction ends. Why: the ingest reads a record,
        judges a message against it (``stale_replay``) and writes the whole row back; another controller's write
        committed between that read and this write would be written over, and a replay judged against the older read
        would pass. Locked first, the read waits for that controller's transaction and sees its write. An advisory lock
        and not ``FOR UPDATE`` on the rows: a record not stored yet is locked too, and the order is the keys', not a
        collation's. SQLite: nothing to do (one write transaction at a time)."""
        if self.db.dialect != "postgresql":
            return
        for part in self.db.chunks(sorted({device_lock_key(d) for d in device_ids})):
            values = ", ".join("(CAST(? AS integer))" for _ in part)
            # PostgreSQL evaluates a volatile output function after the ORDER BY sort (9.6+): the locks go in key order
            self.db.query(f"SELECT pg_advisory_xact_lock({DEVICE_LOCKS}, k) FROM (VALUES {values}) AS t(k) ORDER BY k", list(part))

    def write(self, d: Device) -> None:
        """What the device said (the ingest's write): every column but ``tags``, which only ``set_tags`` changes once
        the record exists, so a tag an operator committed while a flush held the record in hand is not written over
        by the flush's older copy (the CLI and the controllers are other processes: no lock of ours spans them)."""
        self.db.execute(_WRITE_REPORTED, _row(d))

    def set_tags(self, device_id: str, tags: Mapping[str, str]) -> None:
        """Set tags (an empty value removes the key) by compare-and-set on the stored JSON text: a tag written by
        another process between the read and the write makes the write miss, and it is done again on the new text."""
        for _ in range(_TAG_TRIES):
            rows = self.db.query("SELECT tags FROM devices WHERE id = ?", [device_id])
            if not rows:
                if self.db.insert("devices", _row(Device(device_id, tags=_retagged({}, tags))), conflict="ignore"):
                    return
                continue  # the device was registered meanwhile: tag its record
            old = rows[0]["tags"]
            new = json.dumps(_retagged(json.loads(old), tags))
            if self.db.execute("UPDATE devices SET tags = ? WHERE id = ? AND tags = ?", [new, device_id, old]):
                return
        raise RuntimeError(f"the tags of {device_id} kept changing under {_TAG_TRIES} tries")

    def write_job(self, device: str, message: wire.JobUpdate | wire.UpdateCheck, received: float) -> None:
        """Record a job's state — never moving an install job back: an update check is its latest word, but a job's
        states only go forward, and a job update can arrive after a later one (a dead controller's ingest session,
        drained when the leader adopts it, hands over DOWNLOADING after another controller stored ACTIVE)."""
        if isinstance(message, wire.UpdateCheck):
            row = {"device": device, "job": "check", "target": "", "state": message.state, "reason": message.reason, "ts": received}
            self.db.insert("jobs", row, conflict="replace")
            return
        params = [device, message.id, message.target_path, message.state, message.reason, received]
        self.db.execute(_FORWARD_ONLY_JOB, params)

    def jobs(self, device: str) -> list[Job]:
        rows = self.db.query("SELECT job, target, state, reason, ts FROM jobs WHERE device = ? ORDER BY ts", [device])
        return [Job(**row) for row in rows]

    def some(self, ids: Iterable[str]) -> list[Device]:
        out: list[Device] = []
        for part in self.db.chunks(sorted(set(ids))):
            where, args = self.db.in_list("id", part)
            out += [_device(r) for r in self.db.query(f"SELECT * FROM devices WHERE {where}", args)]
        return out

    def last_jobs(self, wanted: Mapping[str, str]) -> dict[str, Job]:
        """Per device of ``wanted`` (device -> target): its newest job on that target (ties: the last row read wins,
        as ``last_job`` takes any one of them)."""
        out: dict[str, Job] = {}
        targets = sorted(set(wanted.values()))
        for part in self.db.chunks(sorted(wanted)):
            where, args = self.db.in_list("device", part)
            of_targets, more = self.db.in_list("target", targets)
            select = f"SELECT device, job, target, state, reason, ts FROM jobs WHERE {where} AND {of_targets} ORDER BY ts"
            rows = self.db.query(select, args + more)
            for row in rows:
                device = row.pop("device")
                if wanted.get(device) == row["target"]:
                    out[device] = Job(**row)
        return out

    def last_job(self, device: str, target: str) -> Job | None:
        rows = self.db.query(
            "SELECT job, target, state, reason, ts FROM jobs WHERE device = ? AND target = ? ORDER BY ts DESC LIMIT 1", [device, target]
        )
        return Job(**rows[0]) if rows else None
