"""The models this device serves, swapped without failing a request.

``ModelHost.swap`` puts a loaded, warmed and health-checked runtime in place of the
current one in one step under a lock: requests that start after it get the new
model, requests already running finish on the old one, which is closed only when
the last of them returns. Inference failures of a freshly activated model are
counted; past a threshold the host asks for a rollback (``on_failing``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from agent import logs
from agent.errors import EdgefleetError, InvalidInput
from agent.runtimes.base import Runtime

__all__ = ["ModelHost", "ServingModel", "UnknownModel"]

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


class ModelHost:
    def __init__(self, failure_threshold: int = 5, on_failing: Callable[[ServingModel, str], None] | None = None) -> None:
        self.failure_threshold = failure_threshold
        self.on_failing = on_failing
        self._models: dict[str, ServingModel] = {}
        self._cond = threading.Condition()

    def models(self) -> dict[str, ServingModel]:
        with self._cond:
            return dict(self._models)

    def get(self, name: str) -> ServingModel | None:
        with self._cond:
            return self._models.get(name)

    def infer(self, name: str, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
        with self._cond:
            m = self._models.get(name)
            if m is None:
                raise UnknownModel(f"no model {name!r} on this device")
            m.inflight += 1
        try:
            out = m.runtime.infer(inputs)
        except InvalidInput:
            raise  # the caller's mistake, not the model's
        except Exception as exc:
            self._failed(m, exc)
            raise
        else:
            m.failures = 0
            m.served += 1
            return out
        finally:
            with self._cond:
                m.inflight -= 1
                self._cond.notify_all()

    def _failed(self, m: ServingModel, exc: BaseException) -> None:
        with self._cond:
            m.failures += 1
            trip = m.on_probation and m.failures == self.failure_threshold and not m._retired
        logs.event(log, "host.inference_failed", logging.WARNING, model=m.name, version=m.version, failures=m.failures, reason=str(exc))
        if trip and self.on_failing is not None:
            reason = f"{m.failures} inference failures in a row on {m.name} {m.version}: {exc}"
            threading.Thread(target=self.on_failing, args=(m, reason), name="auto-rollback", daemon=True).start()

    def swap(self, new: ServingModel, drain_timeout: float = 30.0) -> ServingModel | None:
        """Serve ``new`` from now on; close the previous model once its in-flight requests are done."""
        with self._cond:
            old = self._models.get(new.name)
            self._models[new.name] = new
            if old is not None:
                old._retired = True
        if old is not None:
            self._drain(old, drain_timeout)
        logs.event(log, "host.swapped", model=new.name, version=new.version, variant=new.variant, runtime=new.runtime.name)
        return old

    def remove(self, name: str, drain_timeout: float = 30.0) -> None:
        with self._cond:
            old = self._models.pop(name, None)
        if old is not None:
            self._drain(old, drain_timeout)

    def _drain(self, old: ServingModel, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: old.inflight == 0, timeout):
                logs.event(log, "host.drain_timeout", logging.WARNING, model=old.name, version=old.version, inflight=old.inflight)
        old.runtime.close()  # a request still running past the timeout gets RuntimeClosed, not a crash

    def close(self) -> None:
        for name in list(self.models()):
            self.remove(name, drain_timeout=5.0)
