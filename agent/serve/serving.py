"""Serve predictions over MQTT: ``dev/{id}/infer/{model}`` → ``dev/{id}/pred/{model}`` (or the request's reply_to).

Overload policy: paho's network thread only puts the raw payload into a bounded
queue; when it is full the request is answered at once with ``overloaded`` —
never dropped silently, never queued without bound. Worker threads decode, check
the deadline, run the model (optionally a micro-batch of several requests for the
same model in one call) and answer. Every failure is a typed error on the reply
topic with the request_id; nothing a client sends can stop the workers.
"""

from __future__ import annotations

import collections
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agent import logs
from agent.errors import EdgefleetError
from agent.serve import batching
from agent.serve.host import ModelHost, UnknownModel
from agent.serve.ratelimit import ClientBuckets
from agent.serve.thread_cpu import ThreadCpu
from agent.wire import ROOT, device_topic
from agent.wire.inference import PayloadError, Reply, Request, decode_request, encode_reply, peek_request

__all__ = ["Mirror", "Serving", "ServingStats", "Sink", "Window", "latency_summary"]

log = logging.getLogger("edgefleet.serving")

_REPLY_REST = re.compile(r"[A-Za-z0-9._-]{1,64}(/[A-Za-z0-9._-]{1,64}){0,2}")  # under pred/: model[/client[/tag]]
INLINE_MAX_BYTES = 64 * 1024  # requests up to this size may be served on paho's thread (a fast model, an empty queue)


class Sink(Protocol):
    """Where one request that did not come over MQTT is decoded and answered (the OIP endpoint's HTTP response).

    Why a sink and not a second serving loop: the queue, the overload policy, the limits, micro-batching, telemetry,
    prediction sums and the shadow must be the same whichever way a request came; only reading the request and
    writing its answer differ. Called on a worker thread or, for a fast model, on the thread that admitted it."""

    def decode(self, payload: bytes, max_bytes: int) -> Request: ...

    def ok(self, req: Request, model: str, version: str, outputs: dict[str, np.ndarray], ms: float) -> None: ...

    def error(self, req: Request | None, request_id: str, code: str, message: str) -> None: ...

    def refuse(self, message: str, rate_limited: bool) -> None:
        """Refused before decoding (``overloaded``): the queue is full, or the client is past its rate."""


class Mirror(Protocol):
    """Sees every answer given to a sink (``agent.serve.mirror``: predictions made for HTTP clients, on MQTT too)."""

    def offer(self, model: str, version: str, req: Request, outputs: dict[str, np.ndarray], ms: float) -> None: ...


@dataclass
class _Item:
    model: str
    payload: bytes
    received: float  # time.monotonic()
    qos: int = 1  # the reply goes with the request's QoS
    sink: Sink | None = None  # None: an MQTT request, answered on its reply topic


@dataclass
class Window:
    """One model version's answered calls and errors since the last ``take()``."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class ServingStats:
    """What telemetry reports, per model version (the one that answered or failed); reset by ``take()``.

    Errors go to the version that produced them: a hot swap inside a window gives two
    windows, and on a device with two models each gets its own. Errors with no loaded
    version to blame (an unknown model) are ``unattributed``.
    """

    windows: dict[tuple[str, str], Window] = field(default_factory=dict)
    unattributed: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # by code, all models: logs and tests
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, model: str, version: str, ms: float) -> None:
        with self._lock:
            self._window(model, version).latencies_ms.append(ms)

    def error(self, model: str, version: str | None, code: str) -> None:
        with self._lock:
            self.errors[code] += 1
            if version is None:
                self.unattributed[code] += 1
            else:
                self._window(model, version).errors[code] += 1

    def _window(self, model: str, version: str) -> Window:
        w = self.windows.get((model, version))
        if w is None:
            w = self.windows[(model, version)] = Window()
        return w

    def take(self) -> tuple[dict[tuple[str, str], Window], dict[str, int]]:
        with self._lock:
            windows, unattributed = self.windows, dict(self.unattributed)
            self.windows, self.unattributed, self.errors = {}, collections.Counter(), collections.Counter()
        return windows, unattributed


class Serving:
    def __init__(
        self,
        device_id: str,
        host: ModelHost,
        publish: Callable[[str, bytes, int], object],
        workers: int = 1,
        queue_size: int = 64,
        max_payload_bytes: int = 4 << 20,
        max_batch_rows: int = 1024,
        micro_batch: int = 1,
        micro_batch_wait_ms: float = 2.0,
        inline_below_ms: float = 0.0,
        client_rps: float = 0.0,
        client_burst: float = 200.0,
        mirror: Mirror | None = None,
    ) -> None:
        self.device_id, self.host, self.publish = device_id, host, publish
        self.max_payload_bytes, self.max_batch_rows = max_payload_bytes, max_batch_rows
        self.micro_batch, self.micro_batch_wait = max(1, micro_batch), micro_batch_wait_ms / 1e3
        self.stats = ServingStats()
        self.mirror = mirror
        self.buckets = ClientBuckets(client_rps, client_burst)
        # A model whose calls average under this runs on the MQTT thread when nothing is queued: two thread
        # hand-offs cost more than such a call (measured in benchmarks/serving.py: a 4-float model from 0.76x to 0.84x of a raw echo).
        self.inline_below_s = inline_below_ms / 1e3
        self._call_s: dict[str, float] = {}  # moving average of each model's runtime call
        self.rate_limited = 0  # requests answered `overloaded` because their client was past its rate
        self.inline_served = 0
        self._thread_cpu = ThreadCpu()  # every thread that takes requests in or answers them
        self._counted = self._thread_cpu.counted  # (one dict, changed in place: the check on every request is one lookup)
        self.reply_prefix = device_topic(device_id, "pred") + "/"
        # A SimpleQueue (C) and a bound of our own: queue.Queue's Condition allocates a lock per wait and hands a
        # request to a worker 5-8 us slower (measured: 33 -> 17-27 us a round trip between two threads). The bound is
        # checked, not enforced under a lock: two threads submitting at once can each put one past it.
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self.queue_size = queue_size
        self._closing = False
        self._threads = [threading.Thread(target=self._work, name=f"serving-{i}", daemon=True) for i in range(max(1, workers))]

    def healthy(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def start(self) -> Serving:
        for t in self._threads:
            t.start()
        return self

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Answer what is queued and running, then stop the workers."""
        self._closing = True
        deadline = time.monotonic() + timeout
        for _ in self._threads:
            self._queue.put(None)  # after what is queued: the workers answer that first
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- network thread ------------------------------------------------------------------

    def submit(self, model: str, payload: bytes, qos: int = 1, client: str = "", sink: Sink | None = None) -> None:
        """Called from paho's thread for ``dev/{id}/infer/{model}[/{client}]`` (or the HTTP endpoint's, with its
        ``sink``): enqueue, or answer ``overloaded`` now (the queue is full, or ``client`` is past its rate)."""
        if threading.get_native_id() not in self._counted and not self._thread_cpu.unavailable:
            self._thread_cpu.count_this_thread()  # it takes requests in (paho's, the endpoint's): its CPU is serving's
        if not self.buckets.take(client):
            self.stats.error(model, self._version(model), "overloaded")
            self.rate_limited += 1
            self._refuse(model, payload, qos, sink, "this client is past its request rate", True)
            return
        small = len(payload) <= INLINE_MAX_BYTES  # decoding 4 MB took 333 ms: a large request never runs on this thread
        if small and self._call_s.get(model, 1.0) < self.inline_below_s and self._queue.empty() and not self._closing:
            self.inline_served += 1
            try:
                self._serve([_Item(model, payload, time.monotonic(), qos, sink)])
            except Exception as exc:  # as in _work: a bug costs a request, never the MQTT thread
                logs.event(log, "serving.internal_error", logging.ERROR, reason=f"{type(exc).__name__}: {exc}")
            return
        try:
            if self._closing or self._queue.qsize() >= self.queue_size:
                raise queue.Full
            self._queue.put(_Item(model, payload, time.monotonic(), qos, sink))
        except queue.Full:
            self.stats.error(model, self._version(model), "overloaded")
            self._refuse(model, payload, qos, sink, f"the inference queue is full ({self.queue_size})", False)

    def _refuse(self, model: str, payload: bytes, qos: int, sink: Sink | None, message: str, rate_limited: bool) -> None:
        if sink is not None:
            sink.refuse(message, rate_limited)
            return
        req = peek_request(payload)  # never a full decode on paho's thread
        self._answer_error(model, req, req.request_id, "overloaded", message, qos)

    # -- workers ---------------------------------------------------------------------------

    def _work(self) -> None:
        self._thread_cpu.count_this_thread()
        held: collections.deque[_Item] = collections.deque()
        while True:
            item = held.popleft() if held else self._queue.get()
            if item is None:
                return
            try:
                batch = [item]
                if self.micro_batch > 1:
                    self._gather(batch, held)
                self._serve(batch)
            except Exception as exc:  # a bug in serving must cost a request, never the worker
                logs.event(log, "serving.internal_error", logging.ERROR, reason=f"{type(exc).__name__}: {exc}")

    def _gather(self, batch: list[_Item], held: collections.deque[_Item]) -> None:
        """More requests for the same model, waiting at most ``micro_batch_wait`` for them."""
        until = time.monotonic() + self.micro_batch_wait
        while len(batch) < self.micro_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                return
            if nxt is None or nxt.model != batch[0].model:
                held.append(nxt)  # type: ignore[arg-type]
                return
            batch.append(nxt)

    def cpu_s(self) -> float:
        """CPU seconds used by the threads that take requests in or answer them, all told — everything they do, reading
        and writing MQTT included (what the shadow yields to; see ``agent.serve.thread_cpu``). Where threads have no CPU
        clocks (macOS, Windows): 0, and the machine's idle time alone decides for the shadow (timing each request
        instead would add to every request what only such hosts could use)."""
        return self._thread_cpu.seconds()

    def _serve(self, items: list[_Item]) -> None:
        ready: list[tuple[_Item, Request]] = []
        for item in items:
            try:
                if item.sink is None:
                    req = decode_request(item.payload, self.max_payload_bytes)
                else:
                    req = item.sink.decode(item.payload, self.max_payload_bytes)
            except PayloadError as exc:
                self._fail(item, None, exc.request_id, exc)
                continue
            except Exception as exc:  # a decoder's bug: answered internal, never left without an answer (a sink waits)
                self._fail(item, None, "", exc)
                continue
            if req.deadline_ms is not None and (time.monotonic() - item.received) * 1e3 > req.deadline_ms:
                self.stats.error(item.model, self._version(item.model), "deadline_exceeded")
                self._item_error(item, req, req.request_id, "deadline_exceeded", f"waited past its {req.deadline_ms:g} ms deadline")
                continue
            ready.append((item, req))
        if len(ready) > 1 and self._run_batch(ready):
            return
        for item, req in ready:
            self._run_one(item, req)

    def _inputs(self, model: str, req: Request) -> dict[str, np.ndarray]:
        m = self.host.get(model)
        if m is None:
            raise UnknownModel(f"no model {model!r} on this device")
        specs = {s.name: s for s in m.runtime.inputs}
        if isinstance(req.inputs, dict):
            inputs = req.inputs
        else:
            if len(specs) != 1:
                raise PayloadError(f"the model has inputs {list(specs)}: give them by name", req.request_id)
            inputs = {next(iter(specs)): req.inputs}
        for name, arr in inputs.items():
            spec = specs.get(name)
            axis = spec.batch_axis if spec is not None else 0
            if axis is not None and arr.ndim > axis and arr.shape[axis] > self.max_batch_rows:
                raise PayloadError(f"input {name!r} has {arr.shape[axis]} rows; at most {self.max_batch_rows} per request", req.request_id)
        return inputs

    def _run_one(self, item: _Item, req: Request) -> None:
        try:
            inputs = self._inputs(item.model, req)
            t0 = time.perf_counter()
            outputs = self.host.infer(item.model, inputs)
            took = time.perf_counter() - t0
        except Exception as exc:
            self._fail(item, req, req.request_id, exc)
            return
        self._call_s[item.model] = 0.9 * self._call_s.get(item.model, took) + 0.1 * took
        self._answer(item, req, outputs)

    def _run_batch(self, ready: list[tuple[_Item, Request]]) -> bool:
        """Answer ``ready`` with one call, stacked along each input's batch axis (``agent.serve.batching``); False when
        they cannot share one, one of them is refused, or the merged call fails: the caller then runs them one by one.

        Why any failure falls back: a request with a value the model breaks on (an index past a table) fails the whole
        merged call, and must cost only its own answer, never the others' it happened to be merged with."""
        model = ready[0][0].model
        m = self.host.get(model)
        if m is None or not all(isinstance(r.inputs, dict) for _, r in ready):
            return False
        try:
            merged = batching.merge({s.name: s for s in m.runtime.inputs}, [self._inputs(model, r) for _, r in ready])
            if merged is None:
                return False
            out = self.host.infer(model, merged[0])
            parts = batching.split({s.name: s for s in m.runtime.outputs}, out, merged[1])
        except Exception as exc:  # one bad request must not fail the others
            logs.event(
                log, "serving.batch_fallback", logging.DEBUG, model=model, requests=len(ready), reason=f"{type(exc).__name__}: {exc}"[:300]
            )
            return False
        for (item, req), part in zip(ready, parts):
            self._answer(item, req, part)
        return True

    # -- answers ---------------------------------------------------------------------------

    def _topic(self, model: str, req: Request | None) -> str:
        """The request's reply_to when it is ``pred/{model-ish}[/{name}]`` in this device's tree (what its ACL allows) and
        made of topic-safe names only, else the default. A control character in a topic makes the broker drop the
        connection as malformed: with a persistent session the request came back after every reconnect."""
        if req is not None and req.reply_to and req.reply_to.startswith(self.reply_prefix):
            rest = req.reply_to[len(self.reply_prefix) :]
            if _REPLY_REST.fullmatch(rest):
                return req.reply_to
        return self.reply_prefix + model if _safe_model(model) else f"{ROOT}/dev/{self.device_id}/pred/_"

    def _answer(self, item: _Item, req: Request, outputs: dict[str, np.ndarray]) -> None:
        m = self.host.get(item.model)
        ms = (time.monotonic() - item.received) * 1e3
        version = m.version if m else ""
        if item.sink is not None:
            item.sink.ok(req, item.model, version, outputs, ms)
            if self.mirror is not None:
                self.mirror.offer(item.model, version, req, outputs, ms)
        else:
            reply = Reply(req.request_id, item.model, version, outputs, ms)
            self.publish(self._topic(item.model, req), encode_reply(reply, req.binary, req.b64), item.qos)
        self.stats.ok(item.model, version, ms)

    def _fail(self, item: _Item, req: Request | None, request_id: str, exc: BaseException) -> None:
        if isinstance(exc, EdgefleetError):
            code = exc.code if exc.code in ("bad_request", "unknown_model", "shape_mismatch") else "internal"
            message = str(exc)
        else:
            code, message = "internal", f"{type(exc).__name__}: {exc}"
        self.stats.error(item.model, self._version(item.model), code)
        level = logging.WARNING if code != "internal" else logging.ERROR
        logs.event(log, "serving.error", level, model=item.model, request_id=request_id, code=code, reason=message[:300])
        self._item_error(item, req, request_id, code, message)

    def _item_error(self, item: _Item, req: Request | None, request_id: str, code: str, message: str) -> None:
        if item.sink is not None:
            item.sink.error(req, request_id, code, message[:500])
        else:
            self._answer_error(item.model, req, request_id, code, message, item.qos)

    def _version(self, model: str) -> str | None:
        """The version serving ``model`` now: the one an error counts against (None: no such model here)."""
        m = self.host.get(model)
        return m.version if m is not None else None

    def _answer_error(self, model: str, req: Request | None, request_id: str, code: str, message: str, qos: int) -> None:
        reply = Reply(request_id, error_code=code, error_message=message[:500])
        binary = bool(req and req.binary)
        self.publish(self._topic(model, req), encode_reply(reply, binary), qos)


def _safe_model(model: str) -> bool:
    return 0 < len(model) <= 64 and all(c.isalnum() or c in "._-" for c in model)


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    """p50/p95/p99 of a window's latencies (empty: no answers, nothing to summarise)."""
    if not latencies_ms:
        return {}
    p50, p95, p99 = np.percentile(np.asarray(latencies_ms), [50, 95, 99]).tolist()
    return {"p50_ms": round(p50, 3), "p95_ms": round(p95, 3), "p99_ms": round(p99, 3)}
