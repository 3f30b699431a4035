"""Errors of ``fleet build``; each names the file or the option at fault."""

from __future__ import annotations

from agent.errors import EdgefleetError


class BuildError(EdgefleetError):
    """The build could not finish; nothing was written to the output.

    ``report`` (a ``converters.build.BuildReport``) says what each variant did, when the build got that far.
    """

    code = "build_failed"

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class SourceError(BuildError):
    """The source model is missing, corrupt, truncated or of an unsupported kind."""

    code = "bad_source"


class SamplesError(BuildError):
    """Sample data whose names, shapes or dtypes do not fit the model's inputs."""

    code = "bad_samples"


class MissingExtra(BuildError):
    """An optional dependency is needed for this source or variant."""

    code = "missing_dependency"


class SkipVariant(Exception):
    """This variant cannot be produced from this source here; the build goes on without it."""
