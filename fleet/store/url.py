"""What names a store: a SQLite file's path, or a ``postgresql://`` URL — parsed once, where it is given.

Why its own module: fleet.toml's ``store``, every ``--store`` option and every ``fleet.api`` function take the same
value, and a mistyped one must be refused where it is read (a usage error, exit 2 from the CLI) with a message that
says what is accepted, not later as a driver's traceback. It imports no database driver until a URL needs one.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from agent.errors import EdgefleetError, InvalidOptions

__all__ = ["POSTGRES_SCHEMES", "BadStoreURL", "StoreLocation", "StoreUnreachable", "is_postgres", "redacted", "store_location"]

StoreLocation = Path | str  # a Path: a SQLite file; a str: a postgresql:// URL (store_location makes the difference)
POSTGRES_SCHEMES = ("postgresql", "postgres")
_EXAMPLE = "a SQLite file's path (fleet.db) or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"


class BadStoreURL(InvalidOptions):
    """A store URL this edgefleet cannot open: an unknown scheme, a malformed URL, or PostgreSQL without its extra."""

    code = "bad_store_url"


class StoreUnreachable(EdgefleetError):
    """The PostgreSQL server named by the store URL did not take a connection (down, wrong host, database or user)."""

    code = "store_unreachable"


def is_postgres(location: StoreLocation) -> bool:
    return isinstance(location, str) and location.split("://", 1)[0].lower() in POSTGRES_SCHEMES


def store_location(value: str | Path) -> StoreLocation:
    """``value`` as a store: a ``postgresql://`` URL (checked, kept as a str) or a SQLite path; anything else with a
    scheme is ``BadStoreURL``."""
    if isinstance(value, Path):
        return value
    scheme, sep, _ = value.partition("://")
    if not sep:
        return Path(value)
    if scheme.lower() not in POSTGRES_SCHEMES:
        raise BadStoreURL(f"{redacted(value)}: {scheme}:// is not a store edgefleet opens; expected {_EXAMPLE}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError as exc:
        raise BadStoreURL(f"{redacted(value)}: {exc}; expected {_EXAMPLE}") from exc
    if not parts.hostname and "host=" not in parts.query:
        raise BadStoreURL(f"{redacted(value)}: no host; expected {_EXAMPLE}")
    try:
        from psycopg import conninfo
    except ImportError as exc:
        raise BadStoreURL(f"{redacted(value)}: a PostgreSQL store needs the postgres extra (pip install 'edgefleet[postgres]')") from exc
    try:
        conninfo.conninfo_to_dict(value)
    except Exception as exc:  # psycopg.ProgrammingError: libpq's own parser refused it
        raise BadStoreURL(f"{redacted(value)}: {exc}; expected {_EXAMPLE}") from exc
    return value


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``: what messages and logs may show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://…"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
