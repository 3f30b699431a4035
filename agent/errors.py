"""Every error the agent raises on purpose, each with a stable ``code``.

Why codes: errors travel to MQTT clients and into telemetry counters, where a
Python class name means nothing; the code is the contract. The names follow the
protocol's error kinds (``bad_request``, ``shape_mismatch``, ``internal`` ...).
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base of every deliberate agent error."""

    code = "internal"


# -- runtimes and models -----------------------------------------------------


class RuntimeUnavailable(EdgefleetError):
    """The runtime's Python package or the requested device is not on this machine."""

    code = "runtime_unavailable"


class ModelLoadError(EdgefleetError):
    """A model file could not be loaded: missing, corrupt, truncated or unsupported."""

    code = "model_load_failed"


class UnsupportedModelFormat(ModelLoadError):
    """No runtime reads this kind of file, or not the runtime that was asked for."""

    code = "unsupported_model"


class InferenceError(EdgefleetError):
    """The runtime failed while running a request that passed validation."""

    code = "internal"


class RuntimeClosed(InferenceError):
    """``infer`` was called on a runtime that is closed or was never loaded."""


# -- request validation ------------------------------------------------------


class InvalidInput(EdgefleetError):
    """The request's tensors do not fit the model; the message names the tensor."""

    code = "bad_request"


class UnknownInput(InvalidInput):
    pass


class MissingInput(InvalidInput):
    pass


class DtypeMismatch(InvalidInput):
    pass


class ShapeMismatch(InvalidInput):
    code = "shape_mismatch"


class EmptyInput(InvalidInput):
    pass


class NonFiniteInput(InvalidInput):
    pass


# -- selection -----------------------------------------------------------------


class HealthCheckFailed(EdgefleetError):
    """A loaded model answered a golden sample outside tolerance (or too slowly)."""

    code = "health_check_failed"


class NoUsableRuntime(EdgefleetError):
    """Every candidate runtime failed; ``attempts`` says why each one did."""

    code = "no_usable_runtime"

    def __init__(self, message: str, attempts: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts or []


class InvalidOptions(EdgefleetError):
    """Runtime options or settings that do not validate; the message names the key and value."""

    code = "bad_config"
