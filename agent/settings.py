"""The agent's settings: ``/etc/edgefleet/agent.toml`` overlaid by ``EDGEFLEET_*`` environment variables.

Why pydantic-settings: one typed model is the documentation, the validation and
the error message — a bad value names its key. Nested keys in the environment use
``__``: ``EDGEFLEET_RUNTIME__FORCE_RUNTIME=onnx``. Only the runtime part exists
today; the daemon's settings join it with issue 5.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from agent.errors import EdgefleetError, InvalidOptions

DEFAULT_CONFIG = Path("/etc/edgefleet/agent.toml")
CONFIG_ENV = "EDGEFLEET_CONFIG"


class RuntimeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force_runtime: Literal["litert", "openvino", "onnx", "tensorrt"] | None = None  # replaces the ranking policy
    force_device: str | None = None  # e.g. "CPU", "GPU.0", "NPU", "EDGETPU", "CUDA"
    # Per-runtime options, validated by each runtime's own model: {"litert": {"num_threads": 2}}.
    options: dict[str, dict[str, Any]] = {}
    latency_budget_ms: float | None = None  # a candidate slower than this after warm-up is passed over

    @field_validator("options")
    @classmethod
    def _options_fit_their_runtime(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Check each runtime's options against its own model now, not at the first model load."""
        from agent.runtimes import get_runtime

        for name, opts in value.items():
            try:
                get_runtime(name).parse_options(opts)
            except EdgefleetError as exc:
                raise ValueError(str(exc)) from None
        return value


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", env_nested_delimiter="__", extra="forbid")

    hardware_root: Path = Path("/")
    runtime: RuntimeSettings = RuntimeSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = Path(os.environ.get(CONFIG_ENV, str(DEFAULT_CONFIG)))
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path)


def load_settings(config: str | Path | None = None, **overrides: Any) -> AgentSettings:
    """Settings from ``config`` (default: ``$EDGEFLEET_CONFIG`` or /etc/edgefleet/agent.toml), the environment and overrides.

    Every problem — unreadable TOML, an unknown key, a bad value — is an
    ``InvalidOptions`` whose message names the key and the value.
    """
    previous = os.environ.get(CONFIG_ENV)
    if config is not None:
        os.environ[CONFIG_ENV] = str(config)
    try:
        return AgentSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}={e.get('input')!r}: {e['msg']}" for e in exc.errors())
        raise InvalidOptions(f"settings: {problems}") from exc
    except (ValueError, OSError) as exc:  # TOML syntax errors (tomllib.TOMLDecodeError is a ValueError), unreadable file
        raise InvalidOptions(f"settings file {os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)}: {exc}") from exc
    finally:
        if config is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = previous
