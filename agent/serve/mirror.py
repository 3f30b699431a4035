"""Predictions made for local (HTTP) applications, also published on MQTT: ``dev/{id}/pred/{model}``.

Why: a device that serves a camera application over the Open Inference Protocol still has MQTT subscribers — a
dashboard, an alerting service, a data collector — that consume its predictions. ``serving.publish_predictions``
says which answers go: one in N, optionally only those whose top class or values match a rule. The payload is the
MQTT reply format (``agent.wire.inference.encode_reply``, JSON), so those subscribers read HTTP-made predictions
exactly like MQTT-made ones. Publishing is a non-blocking hand-off to the session (paho's queue); a broker that
is away costs the published copies (QoS 0 by default), never the HTTP answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from agent import logs
from agent.settings import PublishPredictions
from agent.wire import device_topic
from agent.wire.inference import Reply, Request, encode_reply

__all__ = ["PredictionMirror"]

log = logging.getLogger("edgefleet.serving")


class PredictionMirror:
    """``Serving``'s mirror: sees each answer given to a sink (on the serving thread) and publishes the chosen ones."""

    def __init__(self, rule: PublishPredictions, device_id: str, publish: Callable[[str, bytes, int], object]) -> None:
        self.rule, self.device_id, self.publish = rule, device_id, publish
        self.published = 0
        self.failed = 0
        self._seen: dict[str, int] = {}  # matching answers per model: every Nth of them is published
        self._lock = threading.Lock()
        self._classes = frozenset(rule.top_classes)

    def matches(self, outputs: dict[str, np.ndarray]) -> bool:
        """Whether an answer passes the rule (no rule: every answer does)."""
        r = self.rule
        if not self._classes and r.value_above is None and r.value_below is None:
            return True
        arr = outputs.get(r.output) if r.output is not None else next(iter(outputs.values()), None)
        if arr is None or arr.size == 0 or arr.dtype.kind not in "fiub":
            return False
        if self._classes:
            if arr.ndim == 0 or arr.shape[-1] < 2:
                return False
            tops = arr.reshape(-1, arr.shape[-1]).argmax(axis=1)
            if not self._classes.intersection(tops.tolist()):
                return False
        with np.errstate(invalid="ignore"):
            if r.value_above is not None and not bool((arr > r.value_above).any()):
                return False
            if r.value_below is not None and not bool((arr < r.value_below).any()):
                return False
        return True

    def offer(self, model: str, version: str, req: Request, outputs: dict[str, np.ndarray], ms: float) -> None:
        every = self.rule.every
        if every <= 0 or not self.matches(outputs):
            return
        with self._lock:
            n = self._seen[model] = self._seen.get(model, 0) + 1
        if n % every:
            return
        try:
            payload = encode_reply(Reply(req.request_id, model, version, outputs, ms))
            self.publish(device_topic(self.device_id, "pred", model), payload, self.rule.qos)
            self.published += 1
        except Exception as exc:  # the HTTP client has its answer already: a copy that cannot go is counted, not raised
            self.failed += 1
            logs.event(log, "serving.mirror_failed", logging.WARNING, model=model, reason=f"{type(exc).__name__}: {exc}"[:300])
