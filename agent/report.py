"""What the device says about itself: the retained ``reported`` document and the content of each telemetry window.

Why apart from the daemon and the outbox: both are pure reading — of the model host, the serving
counters, the store and the hardware profile — into wire messages, so they can be built (and bounded)
without a broker; the outbox (``agent.outbox``) numbers, stores and sends what ``Windows.take`` returns,
and the session publishes ``reported``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import psutil

from agent import __version__, logs, wire
from agent.hardware import HardwareProfile
from agent.runtimes import probe_all
from agent.selection import preferred_variants
from agent.serve.host import ModelHost, ServingModel
from agent.serve.predictions import PredictionStats
from agent.serve.serving import Serving, latency_summary
from agent.serve.shadow import ShadowRunner
from agent.update.store import InstalledModel

__all__ = ["Windows", "reported", "system_metrics"]

log = logging.getLogger("edgefleet.agent")


def reported(
    device_id: str,
    profile: HardwareProfile,
    host: ModelHost,
    installed: Iterable[InstalledModel],
    enabled: Iterable[str] | None,
    update: wire.UpdateState,
    session: int,
) -> wire.Reported:
    """The retained ``reported`` document: what runs (and what was passed over, and why), what is installed, which
    runtimes and variants this device would take. Raises ValueError past the wire's bounds."""
    probes = probe_all(enabled)
    shadows = host.shadows()
    models = {name: _reported_model(m, shadows.get(name)) for name, m in host.models().items()}
    return wire.Reported.model_validate(
        {
            "device_id": device_id,
            "agent_version": __version__,
            "hardware": profile.summary()[:1000],
            "runtimes": {n: p.version for n, p in probes.items() if p.available},
            "preferred_variants": preferred_variants(profile, probes),
            "models": models,
            "installed": [{"model": m.model, "version": m.version, "variant": m.variant, "status": m.status} for m in installed],
            "update": update,
            "ts": time.time(),
            "session": session,
        }
    )


def _reported_model(m: ServingModel, shadow: ServingModel | None) -> wire.ReportedModel:
    return wire.ReportedModel(
        version=m.version,
        variant=m.variant,
        sha256=m.sha256,
        runtime=m.runtime.name,
        device=m.runtime.describe().device,
        passed_over=[f"{where}: {why}"[:1000] for where, why in m.passed_over][:16],
        shadow=(
            wire.ReportedShadow(version=shadow.version, variant=shadow.variant, sha256=shadow.sha256, runtime=shadow.runtime.name)
            if shadow is not None
            else None
        ),
    )


def system_metrics(process: psutil.Process) -> dict[str, Any]:
    out: dict[str, Any] = {
        "cpu_percent": psutil.cpu_percent(None),
        "process_cpu_percent": process.cpu_percent(None),
        "rss_bytes": process.memory_info().rss,
        "memory_percent": psutil.virtual_memory().percent,
    }
    try:
        temps = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
    except OSError:  # unreadable thermal zones
        temps = {}
    # plausible readings only: some sensors report 65,261 °C (a known NVMe quirk), which the wire would refuse
    readings = [t.current for entries in temps.values() for t in entries if t.current and -100.0 <= t.current <= 300.0]
    if readings:
        out["temperature_c"] = max(readings)
    return out


class Windows:
    """One telemetry window: the serving counters, a sample of predictions and the shadow's comparisons since the last
    ``take()``. ``served`` is the host's ``on_served`` hook: on the serving path, so only cheap sums and a non-blocking
    hand-off to the shadow."""

    def __init__(
        self, device_id: str, session: int, host: ModelHost, serving: Serving, shadow: ShadowRunner, prediction_every: int
    ) -> None:
        self.device_id, self.session = device_id, session
        self.host, self.serving, self.shadow = host, serving, shadow
        self.prediction_every = prediction_every  # every n-th answered call is summed; 0: none (changes on reload)
        self.predictions = PredictionStats()
        self._served_calls = 0
        self._process = psutil.Process()

    def served(self, m: ServingModel, inputs: Mapping[str, object], outputs: dict[str, np.ndarray], seconds: float) -> None:
        every = self.prediction_every
        if every:
            self._served_calls += 1  # not exact across serving threads, and need not be: it picks a sample
            if self._served_calls % every == 0:
                self.predictions.add(m.name, m.version, outputs)
        self.shadow.offer(m, inputs, outputs, seconds)

    def take(self, interval_s: float, update: wire.UpdateState) -> dict[str, Any]:
        """The window's fields of a ``wire.TelemetryBatch`` (the outbox adds seq, ts, interval and drops)."""
        windows, unattributed = self.serving.stats.take()
        predictions = self.predictions.take()
        shadows = self.shadow.take()
        served = self.host.models()
        models = []
        for name, version in sorted(set(windows) | {(name, m.version) for name, m in served.items()}):
            w = windows.get((name, version))
            m = served.get(name)
            entry: dict[str, Any] = {
                "model": name,
                "version": version,
                "count": len(w.latencies_ms) if w else 0,
                "errors": dict(w.errors) if w else {},
                **latency_summary(w.latencies_ms if w else []),
            }
            if m is not None and m.version == version:  # the version serving now
                entry.update(variant=m.variant, runtime=m.runtime.name, device=m.runtime.describe().device)
                if name in shadows:
                    entry["shadow"] = shadows[name]
            if (name, version) in predictions:
                entry["predictions"] = predictions[(name, version)]
            models.append(_bounded(entry, ("predictions", "shadow")))
        return {
            "device_id": self.device_id,
            "session": self.session,
            "models": models,
            "unattributed_errors": unattributed,
            "throughput_rps": round(sum(len(w.latencies_ms) for w in windows.values()) / interval_s, 3),
            "queue_depth": self.serving.queue_depth(),
            "system": system_metrics(self._process),
            "update": update,
        }


def _bounded(entry: dict[str, Any], optional: tuple[str, ...]) -> wire.ModelWindow:
    """The window as a wire message; an optional part out of the wire's bounds (sums of huge outputs) is left out, logged."""
    try:
        return wire.ModelWindow.model_validate(entry)
    except ValueError as exc:
        dropped = [k for k in optional if entry.pop(k, None) is not None]
        logs.event(
            log, "telemetry.window_out_of_bounds", logging.WARNING, model=entry["model"], dropped=",".join(dropped), reason=str(exc)[:200]
        )
        return wire.ModelWindow.model_validate(entry)
