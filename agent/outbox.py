"""The telemetry outbox: batches with a sequence number, store-and-forward through a bounded SQLite table.

Every ``interval_s`` one batch is written to the outbox (one transaction: number and
content together; once sooner after ``report_soon``, the interval then starting over), then
the outbox is sent oldest first while the broker is there; a
batch leaves the outbox only after the broker acknowledged it (QoS 1 PUBACK). So an
outage loses nothing within the limits (``outbox_max_batches``, ``outbox_max_age_s``);
beyond them the oldest go first and the next batch says how many (``dropped_total``).
A batch re-sent after a lost acknowledgement arrives twice with the same ``seq``.
What goes into a batch is ``collect``'s business (``agent.report.Windows``); this module only numbers, keeps and sends.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent import logs, wire
from agent.store import AgentStore

__all__ = ["Outbox"]

log = logging.getLogger("edgefleet.telemetry")

MAX_WINDOW_S = 86_400.0  # the wire's bound on a batch's interval_s (a day's interval, woken a little late, is a day)


class Outbox:
    def __init__(
        self,
        store: AgentStore,
        collect: Callable[[float], dict[str, Any]],
        publish: Callable[[bytes], mqtt.MQTTMessageInfo],
        connected: Callable[[], bool],
        interval_s: float = 10.0,
        max_batches: int = 10_000,
        max_age_s: float = 7 * 86400,
    ) -> None:
        self.store, self.collect, self.publish, self.connected = store, collect, publish, connected
        self.interval_s, self.max_batches, self.max_age_s = interval_s, max_batches, max_age_s
        self.sent = 0
        self._soon = math.inf  # monotonic time of a batch asked for before the interval's end (``report_soon``)
        self._soon_lock = threading.Lock()
        self._window_start = time.monotonic()  # the batch being gathered: since when (its length goes into it)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)

    def start(self) -> Outbox:
        self._window_start = time.monotonic()
        self._thread.start()
        return self

    def stop(self, flush_timeout: float = 5.0) -> None:
        """One last batch, then as much of the outbox as the broker takes within ``flush_timeout``."""
        self._stop.set()
        self._wake.set()
        self._thread.join(10)
        try:
            self.record()
            self.flush(deadline=time.monotonic() + flush_timeout)
        except Exception as exc:  # shutting down: report, never hang
            logs.event(log, "telemetry.final_flush_failed", logging.WARNING, reason=str(exc))

    def kick(self) -> None:
        """Send the outbox now (called on reconnect)."""
        self._wake.set()

    def report_soon(self, delay_s: float) -> None:
        """The next batch within ``delay_s`` (a model just switched version: the controller hears of the new one's
        first seconds); the interval starts over from that batch. Whichever batch comes first answers it: a delay not
        shorter than the interval changes nothing."""
        if 0 < delay_s < self.interval_s:
            with self._soon_lock:
                self._soon = min(self._soon, time.monotonic() + delay_s)
            self._wake.set()

    def _loop(self) -> None:
        next_batch = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            self._wake.wait(max(0.0, min(next_batch, self._soon) - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                now = time.monotonic()
                with self._soon_lock:  # a report_soon from another thread is answered by this batch or the next
                    early, due = now >= self._soon, now >= next_batch
                    if early or due:
                        self._soon = math.inf
                if early:  # asked for: this batch, then whole intervals from it
                    next_batch = now + self.interval_s
                    self.record()
                elif due:
                    next_batch += self.interval_s
                    self.record()
                self.flush(deadline=time.monotonic() + self.interval_s)
            except Exception as exc:  # the outbox keeps the batches; the next round tries again
                logs.event(log, "telemetry.error", logging.ERROR, reason=f"{type(exc).__name__}: {exc}")

    def record(self) -> int:
        """One batch of the window since the last (its length, not the setting: an early or final batch is shorter)."""
        now = time.monotonic()
        window_s = round(min(max(now - self._window_start, 1e-3), MAX_WINDOW_S), 3)
        self._window_start = now

        def make(seq: int, dropped_total: int) -> str:
            batch = wire.TelemetryBatch.model_validate(
                {"seq": seq, "ts": time.time(), "interval_s": window_s, "dropped_total": dropped_total, **self.collect(window_s)}
            )
            return wire.encode(batch).decode()

        seq, dropped = self.store.outbox_add(make, self.max_batches, self.max_age_s)
        if dropped:
            logs.event(log, "telemetry.dropped", logging.WARNING, batches=dropped, reason="outbox limits")
        return seq

    def flush(self, deadline: float) -> int:
        sent = 0
        while self.connected() and time.monotonic() < deadline:
            batch = self.store.outbox_oldest(50)
            if not batch:
                break
            for seq, payload in batch:
                try:
                    info = self.publish(payload.encode())
                    info.wait_for_publish(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                except (RuntimeError, ValueError):  # paho: not queued (connection gone meanwhile)
                    return sent
                if not info.is_published():
                    return sent  # not acknowledged: stays in the outbox, sent again later
                self.store.outbox_sent(seq)
                sent += 1
                self.sent += 1
        return sent
