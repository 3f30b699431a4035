"""Inference runtimes, one module each, found by a registry.

Adding a runtime means adding one file here that subclasses ``Runtime`` with a
``name``; ``runtime_classes()`` imports every module in this package so the new
class registers itself. Backend libraries are imported lazily inside the
modules, so a device without OpenVINO (say) still imports this package.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from functools import cache

from agent.errors import RuntimeUnavailable
from agent.runtimes.base import ProbeResult, Runtime, registered

__all__ = ["Runtime", "ProbeResult", "runtime_classes", "get_runtime", "probe_all"]


@cache
def runtime_classes() -> dict[str, type[Runtime]]:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    return registered()


def get_runtime(name: str) -> type[Runtime]:
    classes = runtime_classes()
    try:
        return classes[name.lower()]
    except KeyError:
        raise RuntimeUnavailable(f"unknown runtime {name!r}; known: {', '.join(sorted(classes))}") from None


def probe_all(enabled: Iterable[str] | None = None) -> dict[str, ProbeResult]:
    """Probe every runtime (or only ``enabled``); a probe that blows up counts as unavailable with the reason.

    A runtime left out is not imported at all: on a Pi that only runs LiteRT, importing
    OpenVINO and ONNX Runtime just to report them would cost ~50 MB of RSS.
    """
    only = {e.lower() for e in enabled} if enabled is not None else None
    results = {}
    for name, cls in sorted(runtime_classes().items()):
        if only is not None and name not in only:
            results[name] = ProbeResult(name, False, reason="not enabled in the settings (runtime.enabled)")
            continue
        try:
            results[name] = cls.probe()
        except Exception as exc:  # a broken install must not take detection down with it
            results[name] = ProbeResult(name, False, reason=f"probe failed: {exc}")
    return results
