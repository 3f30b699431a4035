"""``edge-agent run``: the device daemon — presence, signed updates, rollback, commands.

Threads, and why: paho's network thread only decodes and enqueues (a slow
callback would stall every message); one worker thread owns the update state
machine and the store, so updates, rollbacks and commands never race each
other; serving threads only touch ``ModelHost``. Publishing goes through one
lock (paho is not safe to publish from many threads at once).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__, logs, systemd, wire
from agent.errors import EdgefleetError
from agent.hardware import detect
from agent.mqtt import make_client
from agent.runtimes import probe_all
from agent.selection import preferred_variants
from agent.serve.host import ModelHost, ServingModel
from agent.serve.predictions import PredictionStats
from agent.serve.serving import Serving, latency_summary
from agent.serve.shadow import ShadowRunner
from agent.settings import AgentSettings, RuntimeSettings
from agent.store import AgentStore
from agent.telemetry import Telemetry, system_metrics
from agent.update.jobs import Job
from agent.update.machine import HealthPolicy, Installer, RollbackError
from agent.update.round import RoundHooks, UpdateRound
from agent.wire import Command, WireError, device_topic
from agent.wire.inference import peek_request

__all__ = ["Agent"]

log = logging.getLogger("edgefleet.agent")

EVENT_QUEUE = 64  # commands, checks and rollbacks waiting for the worker
SESSION_EXPIRY_S = 24 * 3600  # commands queued while the device is offline survive a day


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        state = settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self.store = AgentStore(state / "agent.db")
        self.profile = detect(settings.hardware_root)
        u, rs = settings.update, settings.runtime
        self.host = ModelHost(u.auto_rollback_failures, on_failing=self._failing, on_served=self._served)
        sv = settings.serving
        self.predictions = PredictionStats()
        self._served_calls = 0
        self.shadow = ShadowRunner(self.host, sv.shadow_queue, sv.shadow_rtol, sv.shadow_atol)
        health = _health_policy(rs)
        self.installer = Installer(
            self.store,
            state,
            self.host,
            self.profile,
            health,
            u.keep_versions,
            u.disk_reserve_mb * 2**20,
            report=self._report_job,
            sync_bytes=u.sync_kb * 1024,
        )
        self.update_round = UpdateRound(
            self.installer, self.profile, self.device_id, state, RoundHooks(self._checked, self._publish_reported)
        )
        self.last_check = wire.UpdateState(state="never")
        self.rounds = 0  # update rounds finished (whatever their outcome): tests and `ping` can wait on it
        # bounded: a peer flooding commands or director messages must not grow the agent's memory
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue(EVENT_QUEUE)
        self._check_requested = threading.Event()  # a check is queued already: more director messages join it
        self.update_rounds = 0
        self.dropped_events: dict[str, int] = {}
        self._publish_lock = threading.Lock()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._session = self.store.next_session()
        self._client = self._make_client()
        self._worker = threading.Thread(target=self._work, name="agent-worker", daemon=True)
        tm = settings.telemetry
        self.serving = Serving(
            self.device_id,
            self.host,
            self._publish_raw,
            sv.workers,
            sv.queue_size,
            sv.max_payload_kb * 1024,
            sv.max_batch_rows,
            sv.micro_batch,
            sv.micro_batch_wait_ms,
            sv.inline_below_ms,
            sv.client_rps,
            sv.client_burst,
        )
        self.telemetry = Telemetry(
            self.store,
            self._telemetry,
            lambda payload: self._publish_raw(device_topic(self.device_id, "telemetry"), payload, 1),
            self._connected.is_set,
            tm.interval_s,
            tm.outbox_max_batches,
            tm.outbox_max_age_s,
        )
        self._process = psutil.Process()
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Agent:
        for problem in self.installer.restore():
            logs.event(log, "agent.restore_problem", logging.ERROR, reason=problem)
        b = self.settings.broker
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self.shadow.start()
        self.serving.start()
        self.telemetry.start()
        self._client.connect_async(b.host, b.port, keepalive=b.keepalive_s, clean_start=False, properties=props)
        self._client.loop_start()
        self._worker.start()
        self._watchdog.start()
        models = ", ".join(f"{n} {m.version}" for n, m in self.host.models().items()) or "no model yet"
        systemd.notify("READY=1", f"STATUS=serving {models}; broker {b.host}:{b.port}")
        logs.event(log, "agent.started", device=self.device_id, version=__version__, session=self._session)
        return self

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Answer in-flight requests, flush telemetry, say ``disconnected`` (the will only fires on an unclean
        drop), then close models — within about ``timeout`` seconds."""
        systemd.notify("STOPPING=1", "STATUS=stopping")
        self._stopping.set()
        if self._connected.is_set():
            self._client.unsubscribe(device_topic(self.device_id, "infer", "#"))
        self.serving.stop(timeout / 2)
        try:
            self._events.put(("stop", None), timeout=5)
        except queue.Full:  # a worker that does not take its queue is wedged: the join below gives up on it
            pass
        self._worker.join(timeout / 2)
        self.shadow.stop(timeout / 8)
        self.telemetry.stop(flush_timeout=timeout / 4)
        if self._connected.is_set():
            info = self._publish("status", self._status("disconnected"), retain=True)
            info.wait_for_publish(timeout=2)
        self._client.disconnect()
        self._client.loop_stop()
        self.host.close()
        self.store.close()
        logs.event(log, "agent.stopped", device=self.device_id)

    def check_now(self) -> None:
        self._enqueue("check")

    def _enqueue(self, kind: str, arg: Any = None) -> bool:
        """Hand work to the worker without ever blocking paho's thread. Checks coalesce into the one already queued;
        past the queue's bound work is dropped and counted (a dropped command is answered ``overloaded``)."""
        if kind == "check":
            if self._check_requested.is_set():
                return True
            self._check_requested.set()
        try:
            self._events.put_nowait((kind, arg))
            return True
        except queue.Full:
            if kind == "check":
                self._check_requested.clear()
            self.dropped_events[kind] = self.dropped_events.get(kind, 0) + 1
            logs.event(log, "agent.event_dropped", logging.WARNING, kind=kind, queued=self._events.qsize())
            return False

    # -- MQTT ----------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        c = make_client(self.settings.broker, self.device_id, persistent=True)
        c.will_set(device_topic(self.device_id, "status"), wire.encode(self._status("lost")), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.reconnect_delay_set(1, 30)  # exponential backoff between reconnects, 1 s to 30 s
        return c

    def _status(self, state: str) -> wire.Status:
        return wire.Status(state=state, session=self._session, ts=time.time())  # type: ignore[arg-type]

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            logs.event(log, "agent.connect_refused", logging.ERROR, reason=str(reason))
            return
        client.subscribe(
            [
                (device_topic(self.device_id, "director", "#"), 1),
                (device_topic(self.device_id, "cmd"), 1),
                (device_topic(self.device_id, "infer", "#"), 1),
            ]
        )
        self._connected.set()
        self.telemetry.kick()
        self._publish("status", self._status("ready"), retain=True)
        self._publish_reported()
        self._enqueue("check")
        logs.event(log, "agent.connected", broker=f"{self.settings.broker.host}:{self.settings.broker.port}")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            logs.event(log, "agent.disconnected", logging.WARNING, reason=str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's thread: route by topic, decode nothing here. Nothing may raise (paho re-raises and its thread dies)."""
        try:
            topic = wire.parse_device_topic(msg.topic)
            if topic.device != self.device_id:
                return
            if topic.kind == "infer" and 1 <= len(topic.rest) <= 2:  # infer/{model}[/{client}]
                app = topic.rest[1] if len(topic.rest) == 2 else ""
                self.serving.submit(topic.rest[0], bytes(msg.payload), msg.qos, app)
            elif topic.kind == "cmd" and not topic.rest:
                if not self._enqueue("cmd", bytes(msg.payload)):
                    error = wire.ErrorBody(code="overloaded", message=f"{EVENT_QUEUE} events already wait for the agent's worker")
                    rid = peek_request(bytes(msg.payload)).request_id  # the first 1 KB only: the controller can match it
                    self._publish("cmd/reply", wire.CommandReply(request_id=rid, ok=False, error=error))
            elif topic.kind == "director":  # a trigger only; what it says is verified through the repositories
                self._enqueue("check")
        except Exception as exc:  # a bug costs one message, never the MQTT thread
            logs.event(log, "agent.message_failed", logging.ERROR, topic=msg.topic[:120], reason=f"{type(exc).__name__}: {exc}"[:300])

    def _publish(self, what: str, message: wire.WireModel, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self._publish_raw(device_topic(self.device_id, *what.split("/")), wire.encode(message), 1, retain)

    def _publish_raw(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        with self._publish_lock:
            return self._client.publish(topic, payload, qos=qos, retain=retain)

    def _served(self, m: ServingModel, inputs: Any, outputs: dict[str, Any], seconds: float) -> None:
        """Every answered call (on the serving path: only cheap sums and a non-blocking hand-off to the shadow)."""
        every = self.settings.telemetry.prediction_every
        if every:
            self._served_calls += 1  # not exact across serving threads, and need not be: it picks a sample
            if self._served_calls % every == 0:
                self.predictions.add(m.name, m.version, outputs)
        self.shadow.offer(m, inputs, outputs, seconds)

    def _telemetry(self) -> dict[str, Any]:
        """The window's fields of a ``wire.TelemetryBatch`` (``Telemetry`` adds seq, ts, interval and drops)."""
        windows, unattributed = self.serving.stats.take()
        predictions = self.predictions.take()
        shadows = self.shadow.take()
        served = self.host.models()
        keys = set(windows) | {(name, m.version) for name, m in served.items()}
        models = []
        for name, version in sorted(keys):
            w = windows.get((name, version))
            m = served.get(name)
            current = m is not None and m.version == version
            entry: dict[str, Any] = {
                "model": name,
                "version": version,
                "count": len(w.latencies_ms) if w else 0,
                "errors": dict(w.errors) if w else {},
                **latency_summary(w.latencies_ms if w else []),
            }
            if m is not None and current:
                entry.update(variant=m.variant, runtime=m.runtime.name, device=m.runtime.describe().device)
                if name in shadows:
                    entry["shadow"] = shadows[name]
            if (name, version) in predictions:
                entry["predictions"] = predictions[(name, version)]
            models.append(_bounded(wire.ModelWindow, entry, ("predictions", "shadow")))
        window = self.settings.telemetry.interval_s
        return {
            "device_id": self.device_id,
            "session": self._session,
            "models": models,
            "unattributed_errors": unattributed,
            "throughput_rps": round(sum(len(w.latencies_ms) for w in windows.values()) / window, 3),
            "queue_depth": self.serving.queue_depth(),
            "system": system_metrics(self._process),
            "update": self.last_check,
        }

    def _watch(self) -> None:
        """WATCHDOG=1 only while the threads that do the work are alive: systemd restarts a wedged agent."""
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while not self._stopping.wait(interval):
            if self._worker.is_alive() and self.serving.healthy() and self.shadow.healthy() and self.network_alive():
                systemd.notify("WATCHDOG=1")
            else:
                logs.event(
                    log,
                    "agent.unhealthy",
                    logging.ERROR,
                    worker=self._worker.is_alive(),
                    serving=self.serving.healthy(),
                    shadow=self.shadow.healthy(),
                    network=self.network_alive(),
                )

    def network_alive(self) -> bool:
        """paho's network thread runs: if a callback ever raised, paho re-raised and that thread is gone for good,
        leaving a process that serves nothing; the watchdog then stops pinging and systemd restarts the agent."""
        thread = getattr(self._client, "_thread", None)
        return thread is not None and thread.is_alive()

    def reload(self, settings: AgentSettings) -> list[str]:
        """SIGHUP: take what can change live; say which changes need a restart."""
        needs_restart = [
            k for k in ("device_id", "state_dir", "broker", "hardware_root", "serving") if getattr(settings, k) != getattr(self.settings, k)
        ]
        self.settings = self.settings.model_copy(
            update={
                "log_level": settings.log_level,
                "update": settings.update,
                "runtime": settings.runtime,
                "telemetry": settings.telemetry,
            }
        )
        logging.getLogger().setLevel(settings.log_level)
        u, rs = settings.update, settings.runtime
        self.host.failure_threshold = u.auto_rollback_failures
        self.installer.keep_versions, self.installer.disk_reserve = u.keep_versions, u.disk_reserve_mb * 2**20
        self.installer.health = _health_policy(rs)
        self.telemetry.interval_s = settings.telemetry.interval_s
        self.telemetry.max_batches, self.telemetry.max_age_s = settings.telemetry.outbox_max_batches, settings.telemetry.outbox_max_age_s
        logs.event(log, "agent.reloaded", needs_restart=",".join(needs_restart) or "-")
        systemd.notify("STATUS=settings reloaded" + (f"; restart to apply {', '.join(needs_restart)}" if needs_restart else ""))
        return needs_restart

    def _publish_reported(self) -> None:
        """Publish ``reported`` (retained). Called from paho's thread too: a failure is logged, never raised."""
        try:
            self._publish("reported", self._reported(), retain=True)
        except (ValueError, RuntimeError, OSError) as exc:  # e.g. a value past the wire's bounds (pydantic's ValidationError)
            logs.event(log, "agent.reported_failed", logging.ERROR, reason=f"{type(exc).__name__}: {exc}"[:300])

    def _reported(self) -> wire.Reported:
        enabled = self.settings.runtime.enabled
        probes = probe_all(enabled)
        shadows = self.host.shadows()
        models = {
            name: wire.ReportedModel(
                version=m.version,
                variant=m.variant,
                sha256=m.sha256,
                runtime=m.runtime.name,
                device=m.runtime.describe().device,
                passed_over=[f"{where}: {why}"[:1000] for where, why in m.passed_over][:16],
                shadow=(
                    wire.ReportedShadow(version=sm.version, variant=sm.variant, sha256=sm.sha256, runtime=sm.runtime.name)
                    if (sm := shadows.get(name)) is not None
                    else None
                ),
            )
            for name, m in self.host.models().items()
        }
        installed = [{"model": m.model, "version": m.version, "variant": m.variant, "status": m.status} for m in self.store.installed()]
        reported = wire.Reported.model_validate(
            {
                "device_id": self.device_id,
                "agent_version": __version__,
                "hardware": self.profile.summary()[:1000],
                "runtimes": {n: p.version for n, p in probes.items() if p.available},
                "preferred_variants": preferred_variants(self.profile, probes),
                "models": models,
                "installed": installed,
                "update": self.last_check,
                "ts": time.time(),
            }
        )
        return reported

    def _report_job(self, job: Job) -> None:
        self.last_check = wire.UpdateState(
            state=job.state, job=job.id, target=job.update.target_path[:1000], reason=job.reason[:1000], ts=time.time()
        )
        try:
            update = wire.JobUpdate.model_validate({**job.report(), "reason": job.reason[:1000]})
        except ValueError as exc:  # the job goes on; only its report is lost (and says why in the log)
            logs.event(log, "agent.job_report_failed", logging.ERROR, job=job.id, reason=str(exc)[:300])
        else:
            self._publish(f"jobs/{job.id}", update)
        if job.state in ("ACTIVE", "SHADOW", "REJECTED", "FAILED", "ROLLED_BACK"):
            self._publish_reported()

    # -- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        u = self.settings.update
        next_check = time.monotonic() + u.check_interval_s
        backoff = u.retry_s
        last_round = -float("inf")
        while True:
            try:
                kind, arg = self._events.get(timeout=max(0.0, next_check - time.monotonic()))
            except queue.Empty:
                kind, arg = "check", None
            if kind == "stop":
                return
            try:
                if kind == "check":
                    wait = last_round + u.min_check_interval_s - time.monotonic()
                    if wait > 0:  # a burst of director messages: one round per min_check_interval_s at most
                        now = time.monotonic()  # a timer already due must move forward, or the get() below spins
                        next_check = now + wait if next_check <= now else min(next_check, now + wait)
                        continue
                    self._check_requested.clear()  # a message from now on asks for another round
                    last_round = time.monotonic()
                    if self._update():
                        backoff, next_check = u.retry_s, time.monotonic() + u.check_interval_s
                    else:
                        next_check = time.monotonic() + backoff
                        backoff = min(backoff * 2, u.check_interval_s)
                elif kind == "cmd":
                    self._command(arg)
                elif kind == "rollback":
                    model, reason = arg
                    self._rollback(model, reason)
            except Exception as exc:  # the worker must outlive any one bug
                logs.event(log, "agent.worker_error", logging.ERROR, kind=kind, reason=f"{type(exc).__name__}: {exc}")

    def _update(self) -> bool:
        """One update round (``agent.update.round``). False: try again soon."""
        self.update_rounds += 1
        try:
            return self.update_round.run(self.settings.update, self.settings.broker)
        finally:
            self.rounds += 1

    def _checked(self, state: str, reason: str) -> None:
        previous = self.last_check
        self.last_check = wire.UpdateState(state=state, reason=reason[:1000], ts=time.time())
        if state == "REJECTED":
            logs.event(log, "update.rejected", logging.WARNING, reason=reason)
            self._publish("jobs/check", wire.UpdateCheck(state="REJECTED", status="REJECTED", reason=reason[:1000], ts=time.time()))
        if (previous.state, previous.reason) != (state, reason[:1000]):
            self._publish_reported()

    # -- commands and rollback -----------------------------------------------------------

    def _command(self, payload: bytes) -> None:
        try:
            cmd = Command.decode(payload)
        except WireError as exc:
            logs.event(log, "cmd.bad_request", logging.WARNING, reason=str(exc), size=len(payload))
            self._publish("cmd/reply", wire.CommandReply(ok=False, error=wire.ErrorBody(code="bad_request", message=str(exc)[:1000])))
            return
        try:
            if cmd.command == "ping":
                result: Any = {"session": self._session, "models": sorted(self.host.models())}
            elif cmd.command == "check":
                self._enqueue("check")
                result = "scheduled"
            elif cmd.command == "rollback":
                model = cmd.args.get("model")
                if not isinstance(model, str):
                    raise WireError("rollback needs args.model")
                to = self._rollback(model, str(cmd.args.get("reason", "requested by the controller")))
                result = {"model": model, "version": to}
            else:
                raise WireError(f"unknown command {cmd.command!r}")
            reply = wire.CommandReply(request_id=cmd.request_id, command=cmd.command, ok=True, result=result)
        except WireError as exc:
            error = wire.ErrorBody(code="bad_request", message=str(exc)[:1000])
            reply = wire.CommandReply(request_id=cmd.request_id, command=cmd.command, ok=False, error=error)
        except EdgefleetError as exc:
            error = wire.ErrorBody(code=exc.code, message=str(exc)[:1000])
            reply = wire.CommandReply(request_id=cmd.request_id, command=cmd.command, ok=False, error=error)
        self._publish("cmd/reply", reply)

    def _failing(self, model: ServingModel, reason: str) -> None:
        # not _enqueue: the host reports a failing model once, so this must never be dropped; this is the serving
        # thread, not paho's, and the worker drains the queue
        self._events.put(("rollback", (model.name, reason)))

    def _rollback(self, model: str, reason: str) -> str:
        try:
            previous = self.installer.rollback(model, reason)
        except RollbackError as exc:
            logs.event(log, "rollback.failed", logging.ERROR, model=model, reason=str(exc))
            raise
        self._publish_reported()
        return previous.version


def _health_policy(rs: RuntimeSettings) -> HealthPolicy:
    budget = rs.latency_budget_ms / 1e3 if rs.latency_budget_ms is not None else None
    return HealthPolicy(budget, rs.force_runtime, rs.force_device, rs.options, tuple(rs.enabled) if rs.enabled is not None else None)


def _bounded(model: type[wire.ModelWindow], entry: dict[str, Any], optional: tuple[str, ...]) -> wire.ModelWindow:
    """The window as a wire message; an optional part out of the wire's bounds (sums of huge outputs) is left out, logged."""
    try:
        return model.model_validate(entry)
    except ValueError as exc:
        dropped = [k for k in optional if entry.pop(k, None) is not None]
        logs.event(
            log, "telemetry.window_out_of_bounds", logging.WARNING, model=entry["model"], dropped=",".join(dropped), reason=str(exc)[:200]
        )
        return model.model_validate(entry)
