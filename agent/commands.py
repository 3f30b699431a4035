"""The agent's commands as Python functions; ``agent.cli`` is a thin layer over these.

Why: tests, the daemon and other programs call the same code the operator runs,
with typed results instead of printed text.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import EdgefleetError, InvalidInput, InvalidOptions, ModelLoadError
from agent.hardware import HardwareProfile, detect
from agent.runtimes import probe_all
from agent.runtimes.base import ModelDescription, ProbeResult, Runtime
from agent.runtimes.formats import MODEL_FORMATS
from agent.runtimes.hints import InputHints
from agent.selection import ModelVariant, Ranking, choose, rank
from agent.settings import AgentSettings, load_settings

__all__ = [
    "AgentUnreachable",
    "HardwareReport",
    "InferResult",
    "hardware",
    "infer",
    "load_inputs",
    "rollback",
    "run",
    "send_command",
    "status",
]


class AgentUnreachable(EdgefleetError):
    code = "unreachable"


MAX_INPUT_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class HardwareReport:
    profile: HardwareProfile
    probes: dict[str, ProbeResult]
    ranking: Ranking

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile.model_dump(mode="json"),
            "runtimes": {
                n: {"available": p.available, "version": p.version, "devices": list(p.devices), "reason": p.reason}
                for n, p in self.probes.items()
            },
            "ranking": [
                {"runtime": c.runtime, "device": c.device, "format": c.variant.format, "reason": c.reason} for c in self.ranking.candidates
            ],
            "excluded": [{"what": w, "why": y} for w, y in self.ranking.excluded],
        }


def hardware(root: str | Path = "/") -> HardwareReport:
    """The hardware profile and the runtimes ranked for it, each with its reason.

    With no model in hand the ranking is for one fp32, static-shape variant of each
    format, i.e. what this device would prefer given the choice.
    """
    profile = detect(root)
    probes = probe_all()
    placeholders = [ModelVariant(path=Path(f"model.{fmt}"), format=fmt, static_shapes=True) for fmt in MODEL_FORMATS]  # type: ignore[arg-type]
    return HardwareReport(profile, probes, rank(profile, probes, placeholders))


@dataclass
class InferResult:
    outputs: dict[str, np.ndarray]
    latency_s: list[float]
    description: ModelDescription
    passed_over: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Everything, every output whole (a 0-d output is a bare number)."""
        lat = sorted(self.latency_s)
        return {
            "outputs": {k: v.tolist() for k, v in self.outputs.items()},
            "latency_ms": {"first": self.latency_s[0] * 1e3, "median": lat[len(lat) // 2] * 1e3, "runs": len(lat)},
            "model": self.description.to_json(),
            "passed_over": [{"candidate": c, "why": w} for c, w in self.passed_over],
        }

    def summary(self, first: int = 5) -> dict[str, dict[str, Any]]:
        """Per output: shape, dtype, min, max, mean and the first values — what a terminal shows of a 540 KB mask."""
        out = {}
        for name, v in self.outputs.items():
            numbers = np.asarray(v, dtype=np.float64).reshape(-1)
            finite = numbers[np.isfinite(numbers)]
            stats = (float(finite.min()), float(finite.max()), float(finite.mean())) if finite.size else (None, None, None)
            out[name] = {
                "shape": list(v.shape),
                "dtype": v.dtype.name,
                "min": stats[0],
                "max": stats[1],
                "mean": stats[2],
                "first": numbers[:first].tolist(),
                "size": int(v.size),
            }
        return out

    def save(self, path: str | Path) -> None:
        """Every output, whole, into an .npz (by output name)."""
        try:
            with open(path, "wb") as f:
                np.savez(f, **self.outputs)  # type: ignore[arg-type]  # numpy's stub types the keywords as its own options
        except OSError as exc:
            raise InvalidInput(f"cannot write {path}: {exc.strerror or exc}") from exc


def load_inputs(path: str | Path) -> dict[str, np.ndarray] | np.ndarray:
    """Read request tensors from ``.npy`` (one array), ``.npz`` (named) or ``.json`` (object of name -> nested list, or one list)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidInput(f"cannot read input file {path}: {exc.strerror or exc}") from exc
    if size > MAX_INPUT_FILE_BYTES:
        raise InvalidInput(f"input file {path.name} is {size} bytes; the limit is {MAX_INPUT_FILE_BYTES}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)  # type: ignore[no-any-return]
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return {str(k): np.asarray(v) for k, v in data.items()}
            return np.asarray(data)
    except (ValueError, OSError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"cannot parse {path.name}: {exc}") from exc
    except RecursionError:  # json's decoder stops at the recursion limit; a tensor nests a few levels deep
        raise InvalidInput(f"cannot parse {path.name}: nested too deeply") from None
    raise InvalidInput(f"input file must be .npy, .npz or .json, not {path.name}")


def infer(
    model: str | Path,
    inputs: dict[str, Any] | np.ndarray | str | Path,
    runtime: str | None = None,
    device: str | None = None,
    precision: str = "fp32",
    root: str | Path | None = None,
    repeat: int = 1,
    options: dict[str, dict[str, Any]] | None = None,
    settings: AgentSettings | None = None,
    batch_axes: Mapping[str, int | None] | None = None,
) -> InferResult:
    """Run one request locally on the runtime that selection picks (or the one forced).

    The inputs are checked on the loaded model before its warm-up (a bad one is ``InvalidInput``) and are what it is
    warmed up with, so a model that refuses synthetic sizes still runs. ``batch_axes``: a tensor's batch axis by name
    (None: it has none) where the model's own shapes do not tell it. Arguments win over ``settings`` (default: the
    agent's settings file and environment).
    """
    settings = settings or load_settings()
    rs = settings.runtime
    runtime = runtime or rs.force_runtime
    device = device or (rs.force_device if runtime == rs.force_runtime else None)
    options = {**rs.options, **(options or {})}
    root = settings.hardware_root if root is None else root
    budget = rs.latency_budget_ms / 1e3 if rs.latency_budget_ms is not None else None
    model = Path(model)
    if not model.is_file():
        raise ModelLoadError(f"model file not found: {model}")
    if isinstance(inputs, (str, Path)):
        inputs = load_inputs(inputs)
    request = inputs if isinstance(inputs, np.ndarray) else {k: np.asarray(v) for k, v in inputs.items()}
    hints = InputHints(samples=(request,), batch_axes=dict(batch_axes or {}))
    variant = ModelVariant.from_path(model, precision=precision)  # type: ignore[arg-type]
    sel, _ = choose(
        detect(root),
        probe_all(),
        [variant],
        force_runtime=runtime,
        force_device=device,
        options=options,
        latency_budget_s=budget,
        hints=hints,
        request=request,
    )
    rt = sel.runtime
    try:
        _check_batch_axes(rt, hints.batch_axes)
        latencies = []
        outputs: dict[str, np.ndarray] = {}
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            outputs = rt.infer(request)
            latencies.append(time.perf_counter() - t0)
        return InferResult(outputs, latencies, rt.describe(), sel.attempts)
    finally:
        rt.close()


def _check_batch_axes(rt: Runtime, batch_axes: Mapping[str, int | None]) -> None:
    """A batch axis given for a tensor the model does not have, or past its rank, is a typo to report, not to ignore
    (``with_batch_axes`` quietly infers the axis of a tensor whose given one does not fit, as a bundle's must)."""
    specs = {s.name: s for s in (*rt.inputs, *rt.outputs)}
    unknown = sorted(set(batch_axes) - set(specs))
    if unknown:
        raise InvalidOptions(f"--batch-axis {unknown[0]}: the model has no tensor of that name; it has {list(specs)}")
    for name, axis in batch_axes.items():
        shape = list(specs[name].shape)
        if axis is not None and not 0 <= axis < len(shape):
            raise InvalidOptions(f"--batch-axis {name}={axis}: {name!r} has {len(shape)} dimensions {shape}")


def run(settings: AgentSettings | None = None, stop: threading.Event | None = None, config: str | Path | None = None) -> int:
    """The daemon: start the agent and serve until SIGTERM/SIGINT (or ``stop``), then shut down cleanly.

    SIGHUP re-reads the settings (``config``, else ``$EDGEFLEET_CONFIG`` or the default file); a file that
    does not validate is reported and the running settings stay.
    """
    from agent import logs
    from agent.daemon import Agent

    log = logging.getLogger("edgefleet.agent")
    settings = settings or load_settings(config)
    stop = stop or threading.Event()
    reload = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: reload.set())
    agent = Agent(settings).start()
    try:
        # Not a bare wait(): the kernel may deliver SIGTERM to a paho or runtime thread, and Python runs the
        # handler only when the main thread next runs bytecode — a main thread blocked for good never would.
        while not stop.wait(0.2):
            if reload.is_set():
                reload.clear()
                try:
                    agent.reload(load_settings(config))
                except EdgefleetError as exc:
                    logs.event(log, "agent.reload_refused", logging.ERROR, reason=str(exc))
    finally:
        agent.stop()
    return 0


def status(settings: AgentSettings | None = None) -> dict[str, Any]:
    """What this device has installed and its recent update jobs, read from the agent's store."""
    from agent.store import AgentStore

    settings = settings or load_settings()
    db = settings.state_dir / "agent.db"
    if not db.is_file():
        return {"device_id": settings.device_id, "installed": [], "jobs": []}
    store = AgentStore(db)
    try:
        return {
            "device_id": settings.device_id,
            "installed": [m.__dict__ for m in store.installed()],
            "jobs": [j.report() for j in store.jobs()[-10:]],
        }
    finally:
        store.close()


def rollback(model: str, settings: AgentSettings | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Ask the running agent (over MQTT, as the controller would) to switch ``model`` back to its previous version."""
    return send_command(settings or load_settings(), "rollback", {"model": model, "reason": "requested with edge-agent rollback"}, timeout)


def send_command(settings: AgentSettings, command: str, args: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    import uuid

    import paho.mqtt.client as mqtt

    from agent.mqtt import make_client
    from agent.wire import Command, CommandReply, WireError, decode, device_topic

    rid = uuid.uuid4().hex
    replies: queue.Queue[dict[str, Any]] = queue.Queue()
    subscribed = threading.Event()
    reply_topic = device_topic(settings.device_id, "cmd", "reply")

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            reply = decode(CommandReply, bytes(msg.payload))
        except WireError:
            return
        if reply.request_id == rid:
            replies.put(reply.model_dump(exclude_none=True))

    client = make_client(settings.broker, f"{settings.device_id}-cli-{rid[:6]}")
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, *a: c.subscribe(reply_topic, qos=1)
    try:
        client.connect(settings.broker.host, settings.broker.port, keepalive=30)
    except OSError as exc:
        raise AgentUnreachable(f"no broker at {settings.broker.host}:{settings.broker.port}: {exc}") from exc
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise AgentUnreachable("could not subscribe to the agent's replies")
        client.publish(device_topic(settings.device_id, "cmd"), Command(rid, command, args).encode(), qos=1)
        try:
            return replies.get(timeout=timeout)
        except queue.Empty:
            raise AgentUnreachable(f"no answer from {settings.device_id} within {timeout:.0f} s (is edge-agent running?)") from None
    finally:
        client.disconnect()
        client.loop_stop()
