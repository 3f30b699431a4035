"""The controller's settings: ``fleet.toml`` overlaid by ``EDGEFLEET_FLEET_*`` environment variables.

Why the agent's pattern (``agent/settings.py``): one typed model is the documentation, the validation and the error
message — a bad key or value is named. The broker section *is* the agent's ``BrokerSettings``: the controller
connects the way a device does (TLS with the fleet CA, a user name and a password file, MQTT 5 or 3.1.1), through
the same client factory (``fleet.transport.client``). Nested keys in the environment use ``__``:
``EDGEFLEET_FLEET_BROKER__HOST=broker.example.net``. Precedence: arguments, then the environment, then the file.

``fleet.toml`` is read from the working directory when it is there, or from ``--config FILE``; without either the
built-in defaults apply (plain TCP to 127.0.0.1:1883, which is what a private test broker offers).
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from agent.errors import InvalidOptions
from agent.files import atomic_write
from agent.settings import BrokerSettings, write_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (pydantic-settings reads TOML with tomli there too)
    import tomli as tomllib

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_STORE",
    "DEFAULT_TELEMETRY_DAYS",
    "DashboardSettings",
    "FleetSettings",
    "config_file",
    "is_loopback",
    "load_settings",
    "parse_bind",
    "save_dashboard_token",
    "write_fleet_config",
]

DEFAULT_CONFIG = Path("fleet.toml")  # in the working directory; read when it exists
DEFAULT_STORE = Path("fleet.db")  # what the store commands use when neither --store nor `store` says otherwise
DEFAULT_TELEMETRY_DAYS = 7.0  # how long `fleet serve` keeps telemetry when neither --telemetry-days nor the setting says
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")  # what may follow "Bearer " (RFC 6750's b64token), long enough to guess at


def parse_bind(address: str) -> tuple[str, int]:
    """``[HOST]:PORT`` → (host, port); a port alone (``:8080`` or ``8080``) is 127.0.0.1, never every interface.

    Why: a dashboard shows the whole fleet; listening on all interfaces must be asked for by name (``0.0.0.0:8080``),
    and then it needs a token (``is_loopback``).
    """
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = "", address
    host = host.strip("[]")  # [::1]:8080
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r}: expected [HOST]:PORT, e.g. :8080 or 0.0.0.0:8080")
    return host or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host``: 127.0.0.0/8, ::1 or ``localhost``. Anything else needs a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name other than localhost: it may resolve to anything


class DashboardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    http: str | None = None  # [HOST]:PORT of `fleet serve`'s dashboard (None: off unless --http); a port alone is 127.0.0.1
    # Bearer token every request must carry when set; required for any address but loopback, so `fleet serve`
    # generates one on first use, prints it once and keeps it here.
    token: str | None = None

    @field_validator("http")
    @classmethod
    def _bind(cls, value: str | None) -> str | None:
        if value is not None:
            parse_bind(value)
        return value

    @field_validator("token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is not None and not _TOKEN.match(value):
            raise ValueError("expected 16 to 256 characters of A-Z a-z 0-9 . _ ~ + / = -")
        return value


_CONFIG_FILE: ContextVar[Path | None] = ContextVar("fleet_config_file", default=None)


class FleetSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_FLEET_", env_nested_delimiter="__", extra="forbid")

    broker: BrokerSettings = BrokerSettings()  # the agent's broker section: host, port, mqtt_version, TLS, credentials
    # The registry/telemetry/rollout store: `fleet serve` ingests into it and runs rollouts when set (or with --store);
    # the store commands (devices --store, rollout, tag, ...) default to it, else ./fleet.db. A SQLite file's path, or
    # a PostgreSQL database's URL (postgresql://USER@HOST:PORT/DATABASE; the `postgres` extra) for a fleet that
    # outgrows one machine's disk.
    store: Path | str | None = None
    # Telemetry older than this is removed by `fleet serve` (PostgreSQL: whole days' partitions dropped).
    telemetry_retention_days: float = Field(DEFAULT_TELEMETRY_DAYS, ge=0)
    # This controller's stable name among several on one store (`fleet serve`): its ingest session is found again under
    # it after a restart, and the leader takes a dead one's over. Default: the host name and a hash of ROOT.
    controller_id: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    dashboard: DashboardSettings = DashboardSettings()

    @field_validator("store", mode="before")
    @classmethod
    def _store(cls, value: Any) -> Any:
        from fleet.store.url import BadStoreURL, store_location

        if not isinstance(value, (str, Path)):
            return value
        try:
            return store_location(value)
        except BadStoreURL as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_FILE.get()
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        return (*sources, TomlConfigSettingsSource(settings_cls, toml_file=path)) if path is not None else sources

    def store_path(self) -> Path | str:
        """The store the store commands use: ``store`` (a path or a URL) when set, else ./fleet.db."""
        return self.store if self.store is not None else DEFAULT_STORE


def config_file(config: str | Path | None = None) -> Path | None:
    """The file the settings come from: ``config`` when given (it must exist), else ./fleet.toml when it exists, else none."""
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise InvalidOptions(f"settings file {path}: not found")
        return path
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(config: str | Path | None = None, **overrides: Any) -> FleetSettings:
    """Settings from ``config`` (default: ./fleet.toml when present), the environment and ``overrides``.

    Every problem — a missing or unreadable file, bad TOML, an unknown key, a bad value — is an ``InvalidOptions``
    whose message names the key and the value (``settings: broker.prot=1883: Extra inputs are not permitted``).
    """
    path = config_file(config)
    reset = _CONFIG_FILE.set(path)
    try:
        return FleetSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}={e.get('input')!r}: {e['msg']}" for e in exc.errors())
        raise InvalidOptions(f"settings: {problems}") from exc
    except (ValueError, OSError) as exc:  # TOML syntax (tomllib.TOMLDecodeError is a ValueError), an unreadable file
        raise InvalidOptions(f"settings file {path}: {exc}") from exc
    finally:
        _CONFIG_FILE.reset(reset)


def write_fleet_config(path: Path, broker: dict[str, Any], store: Path | str | None = None) -> Path:
    """Write a fleet.toml (mode 0600: a dashboard token may join it later) and check that it loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # 0600 before the first byte lands
    os.chmod(path, 0o600)
    write_config(path, {**({"store": store} if store is not None else {}), "broker": broker})
    load_settings(path)
    return path


def save_dashboard_token(path: Path) -> str:
    """A new dashboard token kept in ``path`` as ``dashboard.token`` (the file is made when absent, 0600); returned.

    The file is edited, not rewritten from the model, so its comments and layout stay. A token already in the file
    is returned as it is.
    """
    text = path.read_text() if path.exists() else ""
    try:
        data = tomllib.loads(text)
    except ValueError as exc:
        raise InvalidOptions(f"settings file {path}: {exc}") from exc
    section = data.get("dashboard", {})
    if isinstance(section, dict) and isinstance(section.get("token"), str):
        return str(section["token"])
    token = secrets.token_urlsafe(32)
    line = f'token = "{token}"\n'
    lines = text.splitlines(keepends=True)
    header = next((i for i, s in enumerate(lines) if re.match(r"^\s*\[\s*dashboard\s*\]\s*(#.*)?$", s)), None)
    if header is not None:
        if not lines[header].endswith("\n"):
            lines[header] += "\n"
        lines.insert(header + 1, line)
        new = "".join(lines)
    else:
        new = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") + "[dashboard]\n" + line
    try:
        saved = tomllib.loads(new).get("dashboard", {}).get("token")
    except (ValueError, AttributeError):
        saved = None
    if saved != token:  # e.g. an inline `dashboard = {...}` table: say what to add instead of guessing
        raise InvalidOptions(f"settings file {path}: could not add dashboard.token; add it yourself: [dashboard] {line.strip()}")
    atomic_write(path, new.encode())  # mkstemp's 0600: the token is a secret
    os.chmod(path, 0o600)
    return token
