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


class WarmupFailed(HealthCheckFailed):
    """No warm-up input the model accepts: its samples failed, or every synthetic size the dimension policy tried did."""


class NoUsableRuntime(EdgefleetError):
    """Every candidate runtime failed; ``attempts`` says why each one did."""

    code = "no_usable_runtime"

    def __init__(self, message: str, attempts: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts or []


class InvalidOptions(EdgefleetError):
    """Runtime options or settings that do not validate; the message names the key and value."""

    code = "bad_config"


# -- update archives -------------------------------------------------------------


class UnsafeArchive(EdgefleetError):
    """A signed update tar that extraction refuses (``agent.update.safe_tar``); the message names the member and why.

    Signed does not mean harmless: a leaked release key or a converter bug must not be
    able to write outside the staging directory or fill the disk, so the agent applies
    its own rules rather than trusting the archive.
    """

    code = "bad_bundle"


class UnsafeMemberPath(UnsafeArchive):
    """A member name that could land outside the destination: absolute, '..', backslash, control characters, a clash."""


class UnsafeMemberType(UnsafeArchive):
    """A member that is not a plain file or directory: a link, device, FIFO, sparse member or unknown type."""


class ArchiveTooLarge(UnsafeArchive):
    """More members, or more bytes in all, than the caller's bound (the signed length for a plain tar)."""
