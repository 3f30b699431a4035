"""Many simulated devices in one process, speaking the real protocol; only the inference numbers are made up.

Each simulated device has its own MQTT connection (paho's, many on one asyncio loop: ``loop_clients``; one task each):
retained ``status`` (with a will of ``lost``) and ``reported``; it follows its director
messages by fetching its director metadata through the repository server (the same
request/reply messages the agent uses — without checking signatures: it is a stand-in),
reports every update state on its job topic, and sends telemetry batches. A
``Behaviour`` makes a share of the devices reject a version, or serve it slowly or
with errors, disagree with the version it shadows, or answer with another
distribution (prediction drift), to exercise the rollout gates. A shadow target in
the director's metadata is "run" beside the active version and reported as the
agent reports it. A device whose connection drops connects again, to the broker's next
address (a clustered broker's other node), as the agent does; its sequence numbers go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import wire
from agent.errors import InvalidOptions
from agent.mqtt import read_password, tls_context
from agent.outbox import MAX_WINDOW_S
from agent.settings import BrokerSettings
from agent.wire import RepoReply, RepoRequest, device_topic, repo_reply_topic, repo_request_topic
from fleet.api import BrokerUnreachable
from fleet.dev.loop_clients import ClientGroup, ConnectionLost, LoopClient, Will
from fleet.transport import client as transport

__all__ = ["Behaviour", "Simulator", "SimulatorThread", "simulate"]

RECONNECT_MIN_S, RECONNECT_MAX_S = 0.2, 5.0  # backoff between a simulated device's connection attempts
REQUEST_TIMEOUT_S = 10.0  # a repository request unanswered this long is given up, as the agent's update.request_timeout_s
# After stop(), how long the devices get to say "disconnected" and close; a device still busy after this is stuck on a
# broker that stopped answering and is abandoned, not waited for.
STOP_GRACE_S = 45.0
MQTT_TIMEOUT_S = 30.0  # a simulated device's wait for its broker's acknowledgements (connect, subscribe, publish)


@dataclass(frozen=True)
class Behaviour:
    """What some devices do on one version: reject it, or serve it slower / with errors.

    Which devices: exactly ``count`` of them, or exactly ``share`` of them (rounded), the
    first by a stable hash of the id — never a random draw, so "30%" is 30%.
    """

    version: str
    share: float = 1.0
    count: int | None = None  # exact number of devices; overrides share
    reject: bool = False
    latency_x: float = 1.0
    error_rate: float = 0.0  # server-side: "internal" errors, the version's fault
    client_error_rate: float = 0.0  # client-side: "bad_request" answers, the callers' fault
    agreement: float = 1.0  # in shadow: the share of live inputs on which it agrees with the serving version
    class_shift: float = 0.0  # this share of its answers move to class 0 (the others are spread evenly)
    mean_shift: float = 0.0  # its mean output moves by this many standard deviations

    @classmethod
    def parse(cls, text: str) -> Behaviour:
        """``VERSION:share=0.4,reject``, ``VERSION:count=6,latency=3`` or
        ``VERSION:latency=5,errors=0.3,client_errors=0.2,agree=0.6,class_shift=0.5,mean_shift=2``."""
        version, _, rest = text.partition(":")
        kw: dict[str, Any] = {"version": version}
        names = {
            "share": "share",
            "latency": "latency_x",
            "errors": "error_rate",
            "client_errors": "client_error_rate",
            "agree": "agreement",
            "class_shift": "class_shift",
            "mean_shift": "mean_shift",
        }
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key == "reject":
                kw["reject"] = True
            elif key == "count":
                kw["count"] = int(value)
            elif key in names:
                kw[names[key]] = float(value)
            else:
                raise ValueError(f"unknown behaviour {item!r}: share=, count=, reject, {'=, '.join(list(names)[1:])}=")
        return cls(**kw)

    def chosen(self, devices: list[str]) -> frozenset[str]:
        """Exactly the devices this behaviour applies to, out of the simulated fleet."""
        n = self.count if self.count is not None else round(self.share * len(devices))
        return frozenset(sorted(devices, key=lambda d: (hash_share(d), d))[: max(0, min(n, len(devices)))])


def hash_share(device: str) -> float:
    return (int(uuid.uuid5(uuid.NAMESPACE_DNS, device).hex[:8], 16) % 10000) / 10000


SIM_CLASSES = 4  # the simulated model answers one of four classes, evenly spread unless a behaviour shifts them


@dataclass
class SimDevice:
    id: str
    model_versions: dict[str, str] = field(default_factory=dict)
    shadows: dict[str, str] = field(default_factory=dict)  # model -> the version it runs in shadow
    seq: int = 0
    acked: list[tuple[int, float]] = field(default_factory=list)  # (seq, time.time()) of each telemetry batch the broker acknowledged
    update: wire.UpdateState = field(default_factory=lambda: wire.UpdateState(state="never"))
    switched: asyncio.Event = field(default_factory=asyncio.Event)  # a version changed: the next batch comes soon
    address: str = ""  # HOST:PORT of the broker node it is (or was last) connected to


class Simulator:
    def __init__(
        self,
        host: str,
        port: int,
        count: int,
        prefix: str = "sim",
        telemetry_s: float = 1.0,
        behaviours: list[Behaviour] | None = None,
        base_latency_ms: float = 2.0,
        requests_per_batch: int = 50,
        hardware: str = "simulated x86_64",
        runtimes: dict[str, str] | None = None,
        initial: dict[str, str] | None = None,
        jitter: float = 0.1,
        broker: BrokerSettings | None = None,
        passwords: Mapping[str, str] | None = None,
        first_report_s: float = 2.0,
    ) -> None:
        """``broker``: TLS, MQTT version and credentials (``host``/``port`` replace its address). ``passwords``: each
        simulated device logs in as itself (user name = its id) with the password ``fleet provision`` issued for it,
        so the generated ACL confines it as it confines a real device; every device needs one."""
        self.broker = transport.broker_settings(host, port, broker)
        self.host, self.port = self.broker.host, self.broker.port
        self.devices = [SimDevice(f"{prefix}-{i:04d}", dict(initial or {})) for i in range(count)]
        missing = [d.id for d in self.devices if passwords is not None and d.id not in passwords]
        if missing:
            raise InvalidOptions(f"no broker password for {len(missing)} simulated device(s), e.g. {missing[0]}")
        self.passwords = dict(passwords or {})
        self._broker_password = read_password(self.broker) if self.broker.username else None  # the settings' own login
        self.telemetry_s, self.behaviours = telemetry_s, behaviours or []
        self.first_report_s = first_report_s  # as the agent's telemetry.first_report_s: a batch that soon after a switch
        ids = [d.id for d in self.devices]
        self._chosen = [(b, b.chosen(ids)) for b in self.behaviours]
        # a simulator started again against the same store must not look like its earlier run sending batches twice
        self.session = time.time_ns() // 1_000_000
        self.load = 1.0  # every device's latency multiplied by this, on every version: load that hits the whole fleet
        self.jitter = jitter  # each batch's p95 varies by up to this share either way
        self.base_latency_ms, self.requests_per_batch = base_latency_ms, requests_per_batch
        self.hardware, self.runtimes = hardware, runtimes or {"onnx": "1.20"}
        self.sent = {"telemetry": 0, "jobs": 0}
        self.connected = 0  # devices connected now
        self.reconnects = 0  # connections lost (each followed by attempts at the next address)
        self.presence_restored: list[int] = []  # the session of each own will read while connected and answered with ``ready``
        self._online: set[str] = set()
        self._seen: set[str] = set()  # connected at least once
        self._stop = asyncio.Event()
        self.mqtt_timeout_s = MQTT_TIMEOUT_S

    def stop(self) -> None:
        self._stop.set()

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        self._stop = asyncio.Event()
        for d in self.devices:  # events bind to the loop that first waits on them: a new run, new events
            d.switched = asyncio.Event()
        # one TLS context and one housekeeping pass for every device
        async with ClientGroup(self.broker.mqtt_version, tls_context(self.broker), self.mqtt_timeout_s) as group:
            tasks = [asyncio.create_task(self._device(group, d, i)) for i, d in enumerate(self.devices)]
            while self.connected < len(self.devices) and not self._stop.is_set():
                await asyncio.sleep(0.05)
                failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
                if failed:
                    raise RuntimeError(f"{len(failed)} simulated devices could not connect: {failed[0].exception()}")
            if on_ready is not None:
                on_ready()
            await self._stop.wait()
            await self._end(tasks)

    async def _end(self, tasks: list[asyncio.Task[None]]) -> None:
        """Cancel every device and wait at most ``STOP_GRACE_S`` for them. A stop must end: a device whose cancellation
        was swallowed (``asyncio.wait_for`` before Python 3.12 can) or replaced by a disconnect timeout also sees
        ``_stop`` in each of its loops."""
        for t in tasks:
            t.cancel()
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        for t in pending:
            t.cancel()  # abandoned: asyncio.run's shutdown cancels them once more and they hold nothing of ours
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved, so asyncio does not log "never retrieved": a device's error at stop is moot

    def _behaviour(self, device: str, version: str) -> Behaviour | None:
        return next((b for b, chosen in self._chosen if b.version == version and device in chosen), None)

    async def _device(self, group: ClientGroup, d: SimDevice, first: int) -> None:
        """One device's connections: to the broker's addresses in turn, from ``first`` (devices spread over a cluster's
        nodes), moving to the next after a drop or a refusal, as the agent's paho client does. A device that never got
        in anywhere gives up (``run`` reports it); one that was connected tries again and again, backing off to 5 s."""
        addresses = self.broker.addresses()
        attempt, backoff = first, RECONNECT_MIN_S
        while not self._stop.is_set():
            host, port = addresses[attempt % len(addresses)]
            attempt += 1
            try:
                await self._connection(group, d, host, port, functools.partial(self._connected_once, d, f"{host}:{port}"))
            except ConnectionLost:
                if self._stop.is_set():
                    return
                if d.id in self._online:
                    self._online.discard(d.id)
                    self.connected -= 1
                    self.reconnects += 1
                    backoff = RECONNECT_MIN_S
                elif d.id not in self._seen and attempt - first >= len(addresses):
                    raise
            await asyncio.sleep(backoff)  # a backoff between attempts, not a wait for a condition
            backoff = min(RECONNECT_MAX_S, backoff * 2)

    def _connected_once(self, d: SimDevice, address: str) -> None:
        d.address = address
        self._online.add(d.id)
        self._seen.add(d.id)
        self.connected += 1

    async def _connection(self, group: ClientGroup, d: SimDevice, host: str, port: int, on_connected: Callable[[], None]) -> None:
        """One connection to ``host:port``: subscribe, say ``ready``, report, then telemetry and updates until it drops."""
        status = device_topic(d.id, "status")
        replies: dict[str, asyncio.Future[RepoReply]] = {}
        updates: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)  # one check waiting at most: see _on_message

        def restore(will_session: int) -> None:  # as the agent: a will of an earlier connection landed after our ``ready``
            asyncio.get_running_loop().call_soon(say_ready, will_session)  # after paho's read that called us, not inside it

        def say_ready(will_session: int) -> None:
            if self._stop.is_set():  # stopping: ``disconnected`` is (or is about to be) the last word, never a ``ready`` after it
                return
            with contextlib.suppress(ConnectionLost):  # lost meanwhile: the next connection says ``ready`` anyway
                client.publish(status, _status("ready", self.session), qos=1, retain=True)
                self.presence_restored.append(will_session)

        presence = Presence(status, self.session, restore)
        client = group.client(
            d.id,
            lambda topic, payload: _on_message(topic, payload, replies, updates, presence),
            username=d.id if d.id in self.passwords else self.broker.username,
            password=self.passwords[d.id] if d.id in self.passwords else self._broker_password,
            will=Will(status, _status("lost", self.session)),
            keepalive=60,
            # MQTT 3.1.1: a persistent session, so a reconnect finds its subscriptions (NATS: its JetStream consumers) in
            # place instead of deleting and making them again, which a cluster that just lost a node took minutes to do.
            clean_session=False,
        )
        try:
            await client.connect(host, port)
            await _subscribe(
                client,
                [(device_topic(d.id, "director", "#"), 1), (repo_reply_topic(d.id), 1), (device_topic(d.id, "cmd"), 1)],
            )
            await client.publish_acknowledged(status, _status("ready", self.session), retain=True)
            await self._report(client, d)
            await _subscribe(client, [(status, 1)])  # after ``ready`` was taken (Session._on_connect says why)
            on_connected()
            await self._connected(client, d, status, replies, updates)
        finally:
            await client.disconnect()

    async def _connected(
        self, client: LoopClient, d: SimDevice, status: str, replies: dict[str, asyncio.Future[RepoReply]], updates: asyncio.Queue[bytes]
    ) -> None:
        """Telemetry and updates until the connection drops (``ConnectionLost``) or the device is stopped (cancelled)."""
        workers = [asyncio.create_task(self._telemetry(client, d)), asyncio.create_task(self._updates(client, d, updates, replies))]
        try:
            await client.lost.wait()
            raise ConnectionLost("connection lost")
        except asyncio.CancelledError:  # stopped: say so, as the agent does before a clean disconnect
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.publish_acknowledged(status, _status("disconnected", self.session), retain=True), 10)
            raise
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _report(self, client: Any, d: SimDevice) -> None:
        def model(m: str, v: str) -> wire.ReportedModel:
            shadow = d.shadows.get(m)
            return wire.ReportedModel(
                version=v,
                variant="onnx-fp32",
                sha256=_fake_sha(m, v),
                runtime="onnx",
                device="CPU",
                passed_over=[],
                shadow=wire.ReportedShadow(version=shadow, variant="onnx-fp32", sha256=_fake_sha(m, shadow), runtime="onnx")
                if shadow
                else None,
            )

        body = wire.Reported(
            device_id=d.id,
            agent_version="sim",
            hardware=self.hardware,
            runtimes=self.runtimes,
            preferred_variants=["onnx-fp32", "onnx-int8"],
            models={m: model(m, v) for m, v in d.model_versions.items()},
            installed=[
                wire.InstalledVersion(model=m, version=v, variant="onnx-fp32", status="active") for m, v in d.model_versions.items()
            ],
            update=d.update,
            ts=time.time(),
            session=self.session,
        )
        await client.publish_acknowledged(device_topic(d.id, "reported"), wire.encode(body), retain=True)

    async def _fetch(self, client: Any, d: SimDevice, replies: dict[str, asyncio.Future[RepoReply]], path: str) -> bytes:
        rid = uuid.uuid4().hex
        fut: asyncio.Future[RepoReply] = asyncio.get_running_loop().create_future()
        replies[rid] = fut
        client.publish(repo_request_topic(d.id), RepoRequest(rid, path).encode(), qos=1)  # the reply is what is waited for
        try:
            reply = await asyncio.wait_for(fut, REQUEST_TIMEOUT_S)
        finally:
            replies.pop(rid, None)  # answered or given up: a reply arriving later finds nothing to wake
        if reply.status != 200:
            raise LookupError(f"{path}: {reply.status}")
        return bytes(reply.data)  # decoded without view=True: this is the bytes object itself, no copy

    async def _updates(
        self, client: Any, d: SimDevice, updates: asyncio.Queue[bytes], replies: dict[str, asyncio.Future[RepoReply]]
    ) -> None:
        while not self._stop.is_set():
            hint = await updates.get()
            try:
                timestamp = wire.load_json(hint, 64 * 1024)  # a hint only, as for the agent: fetched and read below
                base = f"director/{d.id}/metadata"
                snapshot = json.loads(
                    await self._fetch(client, d, replies, f"{base}/{timestamp['signed']['meta']['snapshot.json']['version']}.snapshot.json")
                )
                targets = json.loads(
                    await self._fetch(client, d, replies, f"{base}/{snapshot['signed']['meta']['targets.json']['version']}.targets.json")
                )
            except (LookupError, KeyError, TypeError, ValueError, asyncio.TimeoutError):
                continue
            named = targets["signed"]["targets"].items()
            main = [(p, t.get("custom", {})) for p, t in named if t.get("custom", {}).get("shadow") is not True]
            shadows = {t["custom"].get("model", ""): (p, t["custom"]) for p, t in named if t.get("custom", {}).get("shadow") is True}
            for model in [m for m in d.shadows if m not in shadows]:
                del d.shadows[model]  # the director no longer names it: dropped
                await self._report(client, d)
            for path, custom in main:
                model, version = custom.get("model", ""), custom.get("version", "")
                if d.model_versions.get(model) == version:
                    continue
                if await self._install(client, d, path, model, version, "ACTIVE"):
                    d.model_versions[model] = version
                    if d.shadows.get(model) == version:
                        del d.shadows[model]  # promoted
                    d.switched.set()
                    await self._report(client, d)
            for model, (path, custom) in shadows.items():
                version = custom.get("version", "")
                if d.shadows.get(model) == version:
                    continue
                if await self._install(client, d, path, model, version, "SHADOW"):
                    d.shadows[model] = version
                    d.switched.set()
                    await self._report(client, d)

    async def _install(self, client: Any, d: SimDevice, path: str, model: str, version: str, final: str) -> bool:
        """Job states up to ``final`` (ACTIVE or SHADOW), or REJECTED when a behaviour says so."""
        job = f"{time.time():.0f}-{uuid.uuid4().hex[:8]}"
        behaviour = self._behaviour(d.id, version)
        rejected = behaviour is not None and behaviour.reject
        states = [(s, "") for s in ("DOWNLOADING", "VERIFYING", "STAGED", "HEALTH_CHECK")]
        states.append(("REJECTED", "health check: golden sample error (simulated)") if rejected else (final, ""))
        # published in order without waiting for each acknowledgement, as the agent's paho client does; the last one's
        # is waited for: one round trip for the job's five updates
        for state, reason in states[:-1]:
            self._job(client, d, job, path, model, version, state, reason)
        await client.acknowledged(self._job(client, d, job, path, model, version, *states[-1]))
        return not rejected

    def _job(self, client: LoopClient, d: SimDevice, job: str, path: str, model: str, version: str, state: str, reason: str) -> int:
        """Publish one job update; its message id."""
        now = time.time()
        final = {"ACTIVE": "SUCCEEDED", "SHADOW": "SUCCEEDED", "REJECTED": "REJECTED", "FAILED": "FAILED"}
        body = wire.JobUpdate(
            id=job,
            target_path=path,
            model=model,
            version=version,
            variant="onnx-fp32",
            release_counter=0,
            length=0,
            sha256=_fake_sha(model, version),
            state=state,  # type: ignore[arg-type]
            status=final.get(state, "IN_PROGRESS"),  # type: ignore[arg-type]
            offset=0,
            reason=reason,
            attempts=0,
            created=now,
            updated=now,
            shadow=0,
        )
        d.update = wire.UpdateState(state=state, job=job, target=path, reason=reason, ts=now)
        mid = client.publish(device_topic(d.id, "jobs", job), wire.encode(body), qos=1)
        self.sent["jobs"] += 1
        return mid

    async def _telemetry(self, client: Any, d: SimDevice) -> None:
        """A batch every ``telemetry_s``, and one ``first_report_s`` after a switch (the interval starts over from it;
        its counts are its shorter window's share), as the agent's outbox does."""
        rng = random.Random(d.id)
        await asyncio.sleep(rng.uniform(0, self.telemetry_s))  # spread the fleet's batches over the interval
        last = time.monotonic() - self.telemetry_s  # each connection's first batch: a whole interval, as before
        while not self._stop.is_set():
            now = time.monotonic()
            window_s, last = min(max(now - last, 1e-3), MAX_WINDOW_S), now
            share = min(1.0, window_s / self.telemetry_s)
            d.seq += 1
            models = [self._window(d, model, version, rng, share) for model, version in d.model_versions.items()]
            body = wire.TelemetryBatch(
                device_id=d.id,
                session=self.session,
                seq=d.seq,
                ts=time.time(),
                interval_s=round(window_s, 3),
                dropped_total=0,
                models=models,
                unattributed_errors={},
                throughput_rps=sum(m.count for m in models) / window_s,
                queue_depth=0,
                system=wire.SystemMetrics(cpu_percent=10.0, process_cpu_percent=5.0, rss_bytes=50 * 2**20, memory_percent=20.0),
                update=d.update,
            )
            await client.publish_acknowledged(device_topic(d.id, "telemetry"), wire.encode(body))
            self.sent["telemetry"] += 1
            d.acked.append((d.seq, time.time()))
            await self._until_next_batch(d)

    async def _until_next_batch(self, d: SimDevice) -> None:
        """One interval, or ``first_report_s`` after a switch within it (the agent's ``Outbox.report_soon``)."""
        if self.first_report_s <= 0:
            await asyncio.sleep(self.telemetry_s)
            return
        due = time.monotonic() + self.telemetry_s
        try:
            await asyncio.wait_for(d.switched.wait(), self.telemetry_s)
        except asyncio.TimeoutError:
            return
        d.switched.clear()
        await asyncio.sleep(max(0.0, min(self.first_report_s, due - time.monotonic())))  # never later than the interval's

    def _window(self, d: SimDevice, model: str, version: str, rng: random.Random, share: float = 1.0) -> wire.ModelWindow:
        """One model's window; ``share``: its length against a whole interval (an early batch's calls are fewer)."""
        b = self._behaviour(d.id, version)
        latency = self.base_latency_ms * self.load * (b.latency_x if b else 1.0) * rng.uniform(1 - self.jitter, 1 + self.jitter)
        calls = max(1, round(self.requests_per_batch * share))
        errors = round(calls * (b.error_rate if b else 0.0))  # rounded: a short window's 10 calls at 5% still err
        client_errors = round(calls * (b.client_error_rate if b else 0.0))
        answered = calls - errors - client_errors
        codes = {code: n for code, n in (("internal", errors), ("bad_request", client_errors)) if n}
        shadow = self._shadow_window(d, d.shadows[model], answered, latency, rng) if model in d.shadows else None
        return wire.ModelWindow(
            model=model,
            version=version,
            variant="onnx-fp32",
            runtime="onnx",
            device="CPU",
            count=answered,
            errors=codes,
            p50_ms=round(latency * 0.8, 3),
            p95_ms=round(latency, 3),
            p99_ms=round(latency * 1.2, 3),
            predictions=_predictions(answered, b),
            shadow=shadow,
        )

    def _shadow_window(self, d: SimDevice, version: str, compared: int, active_ms: float, rng: random.Random) -> wire.ShadowWindow:
        b = self._behaviour(d.id, version)
        agreed = round(compared * (b.agreement if b else 1.0))
        values = compared * SIM_CLASSES
        return wire.ShadowWindow(
            version=version,
            kind="top1",
            compared=compared,
            agreed=agreed,
            agreement=round(agreed / compared, 6) if compared else None,
            abs_diff_sum=0.5 * (compared - agreed),
            values=values,
            mean_abs_diff=0.5 * (compared - agreed) / values if values else None,
            mismatched=0,
            errors=int(compared * (b.error_rate if b else 0.0)),
            skipped=0,
            p95_ms=round(self.base_latency_ms * self.load * (b.latency_x if b else 1.0) * rng.uniform(0.9, 1.1), 3),
            active_p95_ms=round(active_ms, 3),
        )


@dataclass(frozen=True)
class Presence:
    """A connection's own status topic, the run's session, and how to say ``ready`` again (``Session._on_own_status``)."""

    topic: str
    session: int
    restore: Callable[[int], None]


def _on_message(
    topic: str, payload: bytes, replies: dict[str, asyncio.Future[RepoReply]], updates: asyncio.Queue[bytes], presence: Presence
) -> None:
    """A device's incoming message, on the loop as it is read: a repository reply wakes its request; a director message
    becomes the one check waiting (as the agent: a hint while a check already waits replaces it, so a device told
    again while busy fetches once more, not once per announcement); its own status saying this run is gone is
    answered with ``ready`` (as the agent). Anything unreadable is dropped."""
    if topic == presence.topic:
        try:
            said = wire.decode(wire.Status, payload)
        except wire.WireError:
            return
        if said.denies(presence.session):
            presence.restore(said.session)
    elif topic.endswith("/repo/reply"):
        try:
            reply = RepoReply.decode(payload)
        except ValueError:
            return
        fut = replies.pop(reply.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)
    elif "/director/" in topic and payload:
        if updates.full():
            updates.get_nowait()
        updates.put_nowait(payload)


async def _subscribe(client: LoopClient, topics: list[tuple[str, int]], tries: int = 4) -> None:
    """Subscribe; a filter the broker refuses is asked for again (after 1, 2, 4 s): a NATS node that lost a peer
    answers SUBSCRIBE with a failure while JetStream elects new leaders, and keeps the connection. Still refused:
    ``ConnectionLost``, and the device moves to the next address."""
    for attempt in range(tries):
        granted = await client.subscribe(topics)
        topics = [t for t, g in zip(topics, granted) if getattr(g, "is_failure", False) or (isinstance(g, int) and g >= 0x80)]
        if not topics:
            return
        if attempt < tries - 1:
            await asyncio.sleep(2.0**attempt)  # a backoff between tries, not a wait for a condition
    raise ConnectionLost(f"subscriptions refused: {', '.join(t for t, _ in topics)}")


def _status(state: str, session: int) -> bytes:
    return wire.encode(wire.Status(state=state, session=session, ts=time.time()))  # type: ignore[arg-type]


def _fake_sha(model: str, version: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{model}/{version}").hex * 2


def _predictions(rows: int, b: Behaviour | None) -> wire.PredictionSums:
    """Prediction sums as the agent publishes them: outputs of mean 0 and spread 1, answers spread over the classes."""
    mean, shift = (b.mean_shift, b.class_shift) if b else (0.0, 0.0)
    share = [(1 - shift) / SIM_CLASSES + (shift if c == 0 else 0.0) for c in range(SIM_CLASSES)]
    classes = [round(rows * p) for p in share]
    return wire.PredictionSums(
        output="y", rows=rows, values=rows, sum=rows * mean, sumsq=rows * (1 + mean * mean), nonfinite=0, classes=classes
    )


class SimulatorThread:
    """A simulator on its own event loop in a background thread (tests, benchmarks, `fleet demo`)."""

    def __init__(self, sim: Simulator) -> None:
        import threading

        self.sim = sim
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="simulator", daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self.sim.run(lambda: self.ready.set()))
        except BaseException as exc:  # reported by start()
            self.error = exc
            self.ready.set()

    def start(self, timeout: float = 120.0) -> SimulatorThread:
        self.thread.start()
        if not self.ready.wait(timeout) or self.error is not None:
            raise RuntimeError(f"simulator did not come up: {self.error}")
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.sim.stop)
        self.thread.join(30)


def simulate(
    count: int,
    broker: BrokerSettings | None = None,
    credentials: Path | None = None,
    prefix: str = "sim",
    telemetry_s: float = 10.0,
    initial: Mapping[str, str] | None = None,
    behaviours: Sequence[Behaviour] = (),
) -> SimulatorThread:
    """``fleet simulate``: ``count`` devices connected and reporting, in a background thread (``stop()`` ends them).

    ``credentials``: each device logs in as itself with ``credentials/{id}/broker-password`` (what ``fleet provision ID
    --out DIR/ID`` writes); ``initial``: MODEL -> VERSION each device starts with.
    """
    passwords = None
    if credentials is not None:
        ids = [f"{prefix}-{i:04d}" for i in range(count)]
        passwords = {d: p for d in ids if (p := _read_secret(credentials / d / "broker-password")) is not None}
    settings = transport.broker_settings(broker=broker)  # every address of a cluster: devices spread over them
    sim = Simulator(
        settings.host,
        settings.port,
        count,
        prefix,
        telemetry_s,
        list(behaviours),
        initial=dict(initial or {}),
        broker=settings,
        passwords=passwords,
    )
    try:
        return SimulatorThread(sim).start()
    except RuntimeError as exc:
        raise BrokerUnreachable(f"{', '.join(settings.hosts) or f'{settings.host}:{settings.port}'}: {exc}") from exc


def _read_secret(path: Path) -> str | None:
    """A password file's content, stripped; None when it is not there (``Simulator`` names the devices without one)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
