"""One line per event, ``key=value``, to stderr (journald keeps it as is).

Why not JSON: journald and ``grep`` read key=value directly, and values with
spaces are quoted so a line always splits back into the same fields.

Under systemd, stderr is a stream to journald, which files every line at the
unit's default priority (info) unless the line starts with a syslog priority,
``<3>`` for an error. So when stderr *is* that stream (``$JOURNAL_STREAM`` names
its device and inode), every line carries its level's prefix and
``journalctl -p err`` finds the errors. A child that merely inherited the
variable while its stderr goes elsewhere (a file, a pipe) writes plain lines.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

__all__ = ["SYSLOG_PRIORITY", "configure", "event", "journald_stream"]

# Python level -> syslog priority (sd-daemon(3)): crit 2, err 3, warning 4, notice 5, info 6, debug 7.
SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
FORMAT = "level=%(levelname)s logger=%(name)s %(message)s"


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event=name k=v ...``."""
    if logger.isEnabledFor(level):
        logger.log(level, "event=%s %s", name, " ".join(f"{k}={_quote(v)}" for k, v in fields.items()))


def journald_stream(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is the journald stream systemd connected: ``$JOURNAL_STREAM`` is
    ``DEVICE:INODE`` of that stream, so compare it with what the file descriptor really is (systemd.exec(5))."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured, closed)
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournaldFormatter(logging.Formatter):
    """Every line of a record — a traceback's included — starts with the record's syslog priority, ``<N>``."""

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno)
        if priority is None:  # a custom level: the nearest standard one at or below it
            priority = next((p for lvl, p in sorted(SYSLOG_PRIORITY.items(), reverse=True) if record.levelno >= lvl), 7)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


def configure(level: int = logging.INFO) -> None:
    """Log to stderr, one ``key=value`` line per event; with ``<N>`` priority prefixes when stderr is journald's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournaldFormatter(FORMAT) if journald_stream(sys.stderr) else logging.Formatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
