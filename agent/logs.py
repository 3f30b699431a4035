"""One line per event, ``key=value``, to stderr (journald keeps it as is).

Why not JSON: journald and ``grep`` read key=value directly, and values with
spaces are quoted so a line always splits back into the same fields.
"""

from __future__ import annotations

import logging
from typing import Any


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event=name k=v ...``."""
    if logger.isEnabledFor(level):
        logger.log(level, "event=%s %s", name, " ".join(f"{k}={_quote(v)}" for k, v in fields.items()))


def configure(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="level=%(levelname)s logger=%(name)s %(message)s")
