"""``edge-agent run``: the device daemon — assembles the parts, runs the worker, the watchdog and live reload.

The parts: the MQTT session (``agent.session``: presence, subscriptions, the one publisher), serving
(``agent.serve``), the telemetry outbox (``agent.outbox``) fed by ``agent.report``, and the update
installer (``agent.update``). What is left here is what ties them together: who handles which topic,
the command table, and the one worker thread.

Threads, and why: paho's network thread only decodes and enqueues (a slow callback would stall every
message); one worker thread owns the update state machine and the store, so updates, rollbacks and
commands never race each other; serving threads only touch ``ModelHost``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent import __version__, logs, report, systemd, wire
from agent.errors import EdgefleetError
from agent.hardware import detect
from agent.metrics import Exporter, Totals
from agent.outbox import Outbox
from agent.serve.host import ModelHost, ServingModel
from agent.serve.mirror import PredictionMirror
from agent.serve.serving import Serving
from agent.serve.shadow import ShadowRunner, SpareCpu
from agent.session import Route, Session
from agent.settings import AgentSettings, BrokerSettings, RuntimeSettings, ServingSettings
from agent.store import AgentStore
from agent.update.jobs import Job
from agent.update.machine import HealthPolicy, Installer, RollbackError
from agent.update.round import RoundHooks, UpdateRound
from agent.wire import Command, WireError, device_topic
from agent.wire.inference import peek_request

__all__ = ["EVENT_QUEUE", "Agent"]

log = logging.getLogger("edgefleet.agent")

EVENT_QUEUE = 64  # commands, checks and rollbacks waiting for the worker

CommandHandler = Callable[[dict[str, Any]], Any]  # a command's args -> its result; raises EdgefleetError to refuse


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        state = settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self.store = AgentStore(state / "agent.db")
        self.profile = detect(settings.hardware_root)
        u, rs = settings.update, settings.runtime
        self.host = ModelHost(u.auto_rollback_failures, on_failing=self._failing)
        sv = settings.serving
        self.shadow = ShadowRunner(
            self.host,
            sv.shadow_queue,
            sv.shadow_rtol,
            sv.shadow_atol,
            sv.shadow_budget,
            SpareCpu(sv.shadow_spare_cores, sv.shadow_busy_cores, serving=lambda: self.serving.cpu_s()),
        )
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
        self._stopping = threading.Event()
        local = sv.broker  # a device-local broker for inference: a second connection, serving only
        self.session = Session(settings.broker, self.device_id, self.store.next_session(), self._routes(local is None), self._on_connected)
        self.serving_session = self._serving_session(local) if local is not None else None
        self._worker = threading.Thread(target=self._work, name="agent-worker", daemon=True)
        self.serving = _serving(sv, self.device_id, self.host, (self.serving_session or self.session).publish_raw)
        self.oip: Any = None  # agent.serve.oip.server.OipServer when serving.http is set (imported only then: the `http` extra)
        if sv.http:
            from agent.serve.oip.server import OipServer

            self.oip = OipServer(sv.http, self.serving, self.host, sv.http_max_connections, sv.http_body_timeout_s)
        self.oip_grpc: Any = None  # agent.serve.oip.grpc_server.OipGrpcServer when serving.grpc is set (the `grpc` extra)
        if sv.grpc:
            from agent.serve.oip.grpc_server import OipGrpcServer

            self.oip_grpc = OipGrpcServer(sv.grpc, self.serving, self.host, sv.grpc_max_rpcs)
        tm = settings.telemetry
        self.totals: Totals | None = Totals() if tm.prometheus else None  # the windows added up, for /metrics
        self.exporter: Exporter | None = None
        self.windows = report.Windows(self.device_id, self.session.number, self.host, self.serving, self.shadow, tm.prediction_every)
        self.host.on_served = self.windows.served
        self.outbox = Outbox(
            self.store,
            self._take_window,
            lambda payload: self.session.publish_raw(device_topic(self.device_id, "telemetry"), payload, 1),
            self.session.is_connected,
            tm.interval_s,
            tm.outbox_max_batches,
            tm.outbox_max_age_s,
        )
        self._commands: dict[str, CommandHandler] = {"ping": self._ping, "check": self._check, "rollback": self._rollback_command}
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Agent:
        for problem in self.installer.restore():
            logs.event(log, "agent.restore_problem", logging.ERROR, reason=problem)
        self.shadow.start()
        self.serving.start()
        if self.oip is not None:
            self.oip.start()
        if self.oip_grpc is not None:
            self.oip_grpc.start()
        self.outbox.start()
        self.session.start()
        if self.serving_session is not None:
            self.serving_session.start()
        if self.totals is not None and self.settings.telemetry.prometheus:
            self.exporter = Exporter(self, self.totals, self.settings.telemetry.prometheus).start()
        self._worker.start()
        self._watchdog.start()
        b = self.settings.broker
        models = ", ".join(f"{n} {m.version}" for n, m in self.host.models().items()) or "no model yet"
        systemd.notify("READY=1", f"STATUS=serving {models}; broker {b.host}:{b.port}")
        logs.event(log, "agent.started", device=self.device_id, version=__version__, session=self.session.number)
        return self

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """The fleet's session, and the serving one when there is one, connected within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        fleet = self.session.wait_connected(timeout)
        return fleet and (self.serving_session is None or self.serving_session.wait_connected(max(0.0, deadline - time.monotonic())))

    def stop(self, timeout: float = 10.0) -> None:
        """Answer in-flight requests, flush telemetry, say ``disconnected`` (the will only fires on an unclean
        drop), then close models — within about ``timeout`` seconds."""
        systemd.notify("STOPPING=1", "STATUS=stopping")
        self._stopping.set()
        (self.serving_session or self.session).begin_close(unsubscribe=["infer"])
        if self.oip is not None:
            self.oip.stop(timeout / 4)  # no new HTTP requests; those queued are answered by serving.stop
        if self.oip_grpc is not None:
            self.oip_grpc.stop(timeout / 2)  # no new gRPC calls; those in flight are answered by serving.stop
        self.serving.stop(timeout / 2)
        if self.oip_grpc is not None:
            self.oip_grpc.wait(timeout / 4)
        if self.serving_session is not None:  # the answers to what was queued went out above
            self.serving_session.close()
        if self.exporter is not None:
            self.exporter.stop()
        try:
            self._events.put(("stop", None), timeout=5)
        except queue.Full:  # a worker that does not take its queue is wedged: the join below gives up on it
            pass
        self._worker.join(timeout / 2)
        self.shadow.stop(timeout / 8)
        self.outbox.stop(flush_timeout=timeout / 4)
        self.session.close()
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

    # -- what arrives over MQTT (paho's thread: hand-offs only) ------------------------------

    def _routes(self, infer: bool = True) -> list[Route]:
        """The fleet session's subscriptions; inference among them unless a device-local broker takes it."""
        routes = [Route("director", self._on_director, wildcard=True), Route("cmd", self._on_command)]
        return [*routes, self._infer_route()] if infer else routes

    def _infer_route(self) -> Route:
        return Route("infer", self._on_request, wildcard=True)

    def _serving_session(self, local: BrokerSettings) -> Session:
        """The second connection, to a device-local broker: inference only, its own client id, no presence."""
        return Session(
            local, self.device_id, self.session.number, [self._infer_route()], _nothing, f"{self.device_id}-serving", presence=False
        )

    def _on_connected(self) -> None:
        """Every (re)connect: send the outbox's backlog, say what runs now, and ask the director what should."""
        self.outbox.kick()
        self._publish_reported()
        self._enqueue("check")

    def _on_director(self, rest: tuple[str, ...], payload: bytes, qos: int) -> None:
        self._enqueue("check")  # a trigger only; what it says is verified through the repositories

    def _on_command(self, rest: tuple[str, ...], payload: bytes, qos: int) -> None:
        if rest or self._enqueue("cmd", payload):
            return
        error = wire.ErrorBody(code="overloaded", message=f"{EVENT_QUEUE} events already wait for the agent's worker")
        rid = peek_request(payload).request_id  # the first 1 KB only: the controller can match it
        self._publish("cmd/reply", wire.CommandReply(request_id=rid, ok=False, error=error))

    def _on_request(self, rest: tuple[str, ...], payload: bytes, qos: int) -> None:
        if 1 <= len(rest) <= 2:  # infer/{model}[/{client}]
            self.serving.submit(rest[0], payload, qos, rest[1] if len(rest) == 2 else "")

    def _publish(self, what: str, message: wire.WireModel, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.session.publish(what, message, retain)

    # -- watchdog and live reload ------------------------------------------------------------

    def _watch(self) -> None:
        """WATCHDOG=1 only while the threads that do the work are alive: systemd restarts a wedged agent."""
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while not self._stopping.wait(interval):
            oip = (self.oip is None or self.oip.healthy()) and (self.oip_grpc is None or self.oip_grpc.healthy())
            if self._worker.is_alive() and self.serving.healthy() and self.shadow.healthy() and self.network_alive() and oip:
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
                    oip=oip,
                )

    def network_alive(self) -> bool:
        return self.session.network_alive() and (self.serving_session is None or self.serving_session.network_alive())

    def reload(self, settings: AgentSettings) -> list[str]:
        """SIGHUP: take what can change live; say which changes need a restart."""
        needs_restart = [
            k for k in ("device_id", "state_dir", "broker", "hardware_root", "serving") if getattr(settings, k) != getattr(self.settings, k)
        ]
        if settings.telemetry.prometheus != self.settings.telemetry.prometheus:
            needs_restart.append("telemetry.prometheus")
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
        self.windows.prediction_every = settings.telemetry.prediction_every
        self.outbox.interval_s = settings.telemetry.interval_s
        self.outbox.max_batches, self.outbox.max_age_s = settings.telemetry.outbox_max_batches, settings.telemetry.outbox_max_age_s
        logs.event(log, "agent.reloaded", needs_restart=",".join(needs_restart) or "-")
        systemd.notify("STATUS=settings reloaded" + (f"; restart to apply {', '.join(needs_restart)}" if needs_restart else ""))
        return needs_restart

    def _take_window(self, window_s: float) -> dict[str, Any]:
        """The outbox's next telemetry window, ``window_s`` long; added to the Prometheus totals too when they are kept."""
        window = self.windows.take(window_s, self.last_check)
        if self.totals is not None:
            self.totals.add(window)
        return window

    def _publish_reported(self) -> None:
        """Publish ``reported`` (retained). Called from paho's thread too: a failure is logged, never raised."""
        try:
            self._publish("reported", self._reported(), retain=True)
        except (ValueError, RuntimeError, OSError) as exc:  # e.g. a value past the wire's bounds (pydantic's ValidationError)
            logs.event(log, "agent.reported_failed", logging.ERROR, reason=f"{type(exc).__name__}: {exc}"[:300])

    def _reported(self) -> wire.Reported:
        installed = self.store.installed()
        return report.reported(
            self.device_id, self.profile, self.host, installed, self.settings.runtime.enabled, self.last_check, self.session.number
        )

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
        if job.state in ("ACTIVE", "SHADOW", "ROLLED_BACK"):  # serving (or comparing) another version now
            self.outbox.report_soon(self.settings.telemetry.first_report_s)

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
        """One command from the controller (the worker's thread), answered on ``cmd/reply``: its result or a typed error."""
        try:
            cmd = Command.decode(payload)
        except WireError as exc:
            logs.event(log, "cmd.bad_request", logging.WARNING, reason=str(exc), size=len(payload))
            self._publish("cmd/reply", wire.CommandReply(ok=False, error=wire.ErrorBody(code="bad_request", message=str(exc)[:1000])))
            return
        try:
            handler = self._commands.get(cmd.command)
            if handler is None:
                raise WireError(f"unknown command {cmd.command!r}")
            reply = wire.CommandReply(request_id=cmd.request_id, command=cmd.command, ok=True, result=handler(cmd.args))
        except EdgefleetError as exc:
            code = "bad_request" if isinstance(exc, WireError) else exc.code
            error = wire.ErrorBody(code=code, message=str(exc)[:1000])
            reply = wire.CommandReply(request_id=cmd.request_id, command=cmd.command, ok=False, error=error)
        self._publish("cmd/reply", reply)

    def _ping(self, args: dict[str, Any]) -> Any:
        return {"session": self.session.number, "models": sorted(self.host.models())}

    def _check(self, args: dict[str, Any]) -> Any:
        self._enqueue("check")
        return "scheduled"

    def _rollback_command(self, args: dict[str, Any]) -> Any:
        model = args.get("model")
        if not isinstance(model, str):
            raise WireError("rollback needs args.model")
        to = self._rollback(model, str(args.get("reason", "requested by the controller")))
        return {"model": model, "version": to}

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
        self.outbox.report_soon(self.settings.telemetry.first_report_s)
        return previous.version


def _nothing() -> None:
    """The serving session's ``on_connected``: presence, reports and update checks belong to the fleet's session."""


def _health_policy(rs: RuntimeSettings) -> HealthPolicy:
    budget = rs.latency_budget_ms / 1e3 if rs.latency_budget_ms is not None else None
    return HealthPolicy(budget, rs.force_runtime, rs.force_device, rs.options, tuple(rs.enabled) if rs.enabled is not None else None)


def _serving(sv: ServingSettings, device_id: str, host: ModelHost, publish: Callable[[str, bytes, int], object]) -> Serving:
    mirror = PredictionMirror(sv.publish_predictions, device_id, publish) if sv.publish_predictions.every else None
    return Serving(
        device_id,
        host,
        publish,
        sv.workers,
        sv.queue_size,
        sv.max_payload_kb * 1024,
        sv.max_batch_rows,
        sv.micro_batch,
        sv.micro_batch_wait_ms,
        sv.inline_below_ms,
        sv.client_rps,
        sv.client_burst,
        mirror,
    )
