"""Log lines under journald carry their syslog priority, so `journalctl -p err` finds the errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import logging
from agent import logs

logs.configure(logging.DEBUG)
log = logging.getLogger("edgefleet.test")
logs.event(log, "a.debug", logging.DEBUG, n=1)
logs.event(log, "a.info", n=2)
logs.event(log, "a.warning", logging.WARNING, reason="slow disk")
logs.event(log, "a.error", logging.ERROR, reason="broker refused")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("event=a.crash")
"""


def run_child(tmp_path: Path, journal_stream: str | None) -> list[str]:
    """The child's stderr lines; ``journal_stream`` "self" sets JOURNAL_STREAM to the device:inode of that very file,
    as systemd does when it connects stderr to journald."""
    out = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(out, "wb") as f:
        if journal_stream == "self":
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        subprocess.run([sys.executable, "-c", CHILD], stderr=f, env=env, timeout=60, check=True)
    return out.read_text().splitlines()


def test_under_journald_every_line_starts_with_its_syslog_priority(tmp_path: Path) -> None:
    lines = run_child(tmp_path, "self")
    by_event = {e: next(line for line in lines if f"event={e}" in line) for e in ("a.debug", "a.info", "a.warning", "a.error", "a.crash")}
    assert by_event["a.debug"].startswith("<7>level=DEBUG ")
    assert by_event["a.info"].startswith("<6>level=INFO ")
    assert by_event["a.warning"].startswith("<4>level=WARNING ")
    assert by_event["a.error"].startswith("<3>level=ERROR ")
    assert by_event["a.crash"].startswith("<3>level=ERROR ")
    traceback = lines[lines.index(by_event["a.crash"]) + 1 :]
    assert traceback and all(line.startswith("<3>") for line in traceback)  # the traceback is an error too, line by line
    assert any("ZeroDivisionError" in line for line in traceback)


def test_without_journald_or_with_an_inherited_variable_lines_stay_plain(tmp_path: Path) -> None:
    for stream in (None, "1:2"):  # not set; set for some other stream (a child that inherited it, stderr elsewhere)
        lines = run_child(tmp_path, stream)
        assert any(line.startswith("level=ERROR ") and "event=a.error" in line for line in lines), lines
        assert not any(line.startswith("<") for line in lines), lines
