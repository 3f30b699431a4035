"""The runtime registry: every inference runtime edgefleet knows, built from the files of this package.

Adding a runtime means adding one file here that subclasses ``Runtime`` (with its
name, formats, options, tiers, default device and preferred variants) and passes
the class to ``register``; ``runtime_classes()`` imports every module of this
package once so their classes register themselves, as Frigate's detector plugins
do. A runtime from elsewhere (a third party, a test) calls ``register`` itself.
Backend libraries are imported lazily inside the modules, so a device without
OpenVINO (say) still imports this package, and importing it imports none of them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from functools import cache
from typing import TypeVar

from agent.errors import RuntimeUnavailable
from agent.runtimes.base import ProbeResult, Runtime

__all__ = ["register", "unregister", "runtime_classes", "get_runtime", "probe_all", "runtime_for_format"]

_REGISTRY: dict[str, type[Runtime]] = {}
R = TypeVar("R", bound=type[Runtime])


def register(cls: R) -> R:
    """Make ``cls`` known under its ``name`` (usable as a class decorator); a second class of that name replaces it."""
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget the runtime called ``name`` (a test's toy runtime, say); unknown names are ignored."""
    _REGISTRY.pop(name, None)


@cache
def _discover() -> None:
    """Import every module of this package once: each runtime's file registers its class."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def runtime_classes() -> dict[str, type[Runtime]]:
    """Every registered runtime by name (a copy: registering goes through ``register``)."""
    _discover()
    return dict(_REGISTRY)


def get_runtime(name: str) -> type[Runtime]:
    classes = runtime_classes()
    try:
        return classes[name.lower()]
    except KeyError:
        raise RuntimeUnavailable(f"unknown runtime {name!r}; known: {', '.join(sorted(classes))}") from None


def runtime_for_format(fmt: str) -> type[Runtime]:
    """The runtime that is the reference reader of ``fmt``: the converters check that format's variants on it."""
    for cls in runtime_classes().values():
        if cls.reference_for == fmt:
            return cls
    raise RuntimeUnavailable(f"no runtime is the reference reader of {fmt} models")


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
