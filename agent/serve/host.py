"""The models this device serves, swapped without failing a request.

``ModelHost.swap`` puts a loaded, warmed and health-checked runtime in place of the
current one in one step under a lock: requests that start after it get the new
model, requests already running finish on the old one, which is closed only when
the last of them returns. Inference failures of a freshly activated model are
counted; past a threshold the host asks for a rollback (``on_failing``).

A model may also have a *shadow*: another version, loaded and health-checked like
an update, that answers nobody. ``on_served`` sees every answered call (inputs,
outputs, seconds) so the agent can run the shadow on the same inputs afterwards and
keep prediction statistics; it must not block (the reply is waiting).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from agent import logs
from agent.errors import EdgefleetError, InvalidInput
from agent.runtimes.base import Runtime
from agent.runtimes.tensors import as_accepted

__all__ = ["ModelHost", "ServedHook", "ServingModel", "UnknownModel"]

log = logging.getLogger("edgefleet.host")


class UnknownModel(EdgefleetError):
    code = "unknown_model"


@dataclass
class ServingModel:
    name: str
    version: str
    variant: str
    sha256: str
    runtime: Runtime
    inflight: int = 0
    failures: int = 0  # consecutive inference failures
    served: int = 0
    on_probation: bool = False  # newly activated: repeated failures roll it back
    passed_over: list[tuple[str, str]] = field(default_factory=list)  # (runtime:device, why) selection skipped
    _retired: bool = field(default=False, repr=False)


ServedHook = Callable[[ServingModel, Mapping[str, object], dict[str, np.ndarray], float], None]


class ModelHost:
    def __init__(
        self,
        failure_threshold: int = 5,
        on_failing: Callable[[ServingModel, str], None] | None = None,
        on_served: ServedHook | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.on_failing = on_failing
        self.on_served = on_served
        self._models: dict[str, ServingModel] = {}
        self._shadows: dict[str, ServingModel] = {}
        # A plain lock under the condition (its with-block is one C call; a Condition's own costs a Python frame each
        # way) and a count of who waits on it, so that a request notifies only when someone waits for a drain.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0

    def models(self) -> dict[str, ServingModel]:
        with self._lock:
            return dict(self._models)

    def get(self, name: str) -> ServingModel | None:
        # No lock: asked several times per request, and one dict lookup is atomic in CPython; writers still hold it
        # (``_replace`` swaps a slot in one step, so a reader sees the old model or the new one, both whole).
        return self._models.get(name)

    def infer(self, name: str, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
        with self._lock:
            m = self._models.get(name)
            if m is None:
                raise UnknownModel(f"no model {name!r} on this device")
            m.inflight += 1
        try:
            accepted = _as_model_takes(m.runtime, inputs)
            t0 = time.perf_counter()
            out = m.runtime.infer(accepted)
            took = time.perf_counter() - t0
        except InvalidInput:
            raise  # the caller's mistake, not the model's
        except Exception as exc:
            self._failed(m, exc)
            raise
        else:
            m.failures = 0
            m.served += 1
            if self.on_served is not None:
                self.on_served(m, inputs, out, took)
            return out
        finally:
            self._done(m)

    # -- shadows: a second version beside the active one, fed its inputs, answering nobody --------

    def shadow(self, name: str) -> ServingModel | None:
        # No lock: asked on every answered call, and one dict lookup is atomic in CPython; writers still hold it.
        return self._shadows.get(name)

    def has_shadows(self) -> bool:
        return bool(self._shadows)  # no lock: one read of a dict's size (the shadow thread asks 10 times a second)

    def shadows(self) -> dict[str, ServingModel]:
        with self._lock:
            return dict(self._shadows)

    def set_shadow(self, new: ServingModel, drain_timeout: float = 30.0) -> None:
        self._replace(self._shadows, new.name, new, drain_timeout)
        logs.event(log, "host.shadow_set", model=new.name, version=new.version, variant=new.variant, runtime=new.runtime.name)

    def remove_shadow(self, name: str, drain_timeout: float = 30.0) -> ServingModel | None:
        old = self._replace(self._shadows, name, None, drain_timeout)
        if old is not None:
            logs.event(log, "host.shadow_removed", model=name, version=old.version)
        return old

    def take_shadow(self, name: str, sha256: str) -> ServingModel | None:
        """The loaded shadow with these bytes, no longer a shadow (promoted: ``swap`` it in without loading again)."""
        with self._lock:
            m = self._shadows.get(name)
            if m is None or m.sha256 != sha256:
                return None
            del self._shadows[name]
            self._idle(m, 30.0)  # the shadow thread's last call on it
            return m

    def infer_shadow(self, name: str, version: str, inputs: Mapping[str, object]) -> tuple[dict[str, np.ndarray], float] | None:
        """Run ``name``'s shadow of ``version`` on ``inputs``: (outputs, seconds), or None when that shadow is gone."""
        with self._lock:
            m = self._shadows.get(name)
            if m is None or m.version != version:
                return None
            m.inflight += 1
        try:
            accepted = _as_model_takes(m.runtime, inputs)  # as ``infer`` does: the timing is the model's alone, as the active's
            t0 = time.perf_counter()
            out = m.runtime.infer(accepted)
            return out, time.perf_counter() - t0
        finally:
            self._done(m)

    def _done(self, m: ServingModel) -> None:
        """One call on ``m`` ended: wake whoever waits for it to drain (``_idle``), when anyone does."""
        with self._lock:
            m.inflight -= 1
            if self._waiting and m.inflight == 0:
                self._cond.notify_all()

    def _idle(self, m: ServingModel, timeout: float) -> bool:
        """Wait (holding the lock) until no call runs on ``m``; False after ``timeout`` seconds."""
        self._waiting += 1
        try:
            return self._cond.wait_for(lambda: m.inflight == 0, timeout)
        finally:
            self._waiting -= 1

    def _failed(self, m: ServingModel, exc: BaseException) -> None:
        with self._lock:
            m.failures += 1
            trip = m.on_probation and m.failures == self.failure_threshold and not m._retired
        logs.event(log, "host.inference_failed", logging.WARNING, model=m.name, version=m.version, failures=m.failures, reason=str(exc))
        if trip and self.on_failing is not None:
            reason = f"{m.failures} inference failures in a row on {m.name} {m.version}: {exc}"
            threading.Thread(target=self.on_failing, args=(m, reason), name="auto-rollback", daemon=True).start()

    def swap(self, new: ServingModel, drain_timeout: float = 30.0) -> ServingModel | None:
        """Serve ``new`` from now on; close the previous model once its in-flight requests are done."""
        old = self._replace(self._models, new.name, new, drain_timeout)
        logs.event(log, "host.swapped", model=new.name, version=new.version, variant=new.variant, runtime=new.runtime.name)
        return old

    def remove(self, name: str, drain_timeout: float = 30.0) -> None:
        self._replace(self._models, name, None, drain_timeout)

    def _replace(self, slots: dict[str, ServingModel], name: str, new: ServingModel | None, drain_timeout: float) -> ServingModel | None:
        """Put ``new`` (None: nothing) in ``name``'s slot in one step; the one it replaced is retired, drained, closed."""
        with self._lock:
            old = slots.pop(name, None)
            if new is not None:
                slots[name] = new
            if old is not None:
                old._retired = True
        if old is not None:
            self._drain(old, drain_timeout)
        return old

    def _drain(self, old: ServingModel, timeout: float) -> None:
        with self._lock:
            if not self._idle(old, timeout):
                logs.event(log, "host.drain_timeout", logging.WARNING, model=old.name, version=old.version, inflight=old.inflight)
        old.runtime.close()  # a request still running past the timeout gets RuntimeClosed, not a crash

    def close(self) -> None:
        for name in list(self.shadows()):
            self.remove_shadow(name, drain_timeout=5.0)
        for name in list(self.models()):
            self.remove(name, drain_timeout=5.0)


def _as_model_takes(runtime: Runtime, inputs: Mapping[str, object]) -> Mapping[str, object]:
    """A one-input request's array in the dtype ``runtime`` takes (JSON numbers decode as float64 or int64: a copy of our
    own), so the runtime remembers its kind and skips its checks from the next request on; anything else as it came.

    Why here and not where the request is decoded: the spec is the model's that runs the call (a hot swap may have put
    in a version that takes another dtype), and ``on_served`` still gets the request as sent (a shadow of another dtype
    must not judge inputs rounded for the active model). Several inputs have no such path: converting them here would
    change which input's error is reported first."""
    specs = runtime.inputs
    if len(inputs) != 1 or len(specs) != 1:
        return inputs
    ((name, arr),) = inputs.items()
    spec = specs[0]
    if type(arr) is not np.ndarray or name != spec.name or arr.dtype is spec.accepts:  # (a binary request's usually is)
        return inputs
    converted = as_accepted(spec, arr)
    return inputs if converted is arr else {name: converted}
