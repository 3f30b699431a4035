"""The sd_notify protocol, spoken directly: READY, STATUS, WATCHDOG and STOPPING datagrams to $NOTIFY_SOCKET.

Why not python-systemd: it needs libsystemd headers to build, and the protocol is one
datagram per message (``man sd_notify``). Outside systemd (no $NOTIFY_SOCKET) every
call is a no-op.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "watchdog_interval"]


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines in one datagram; False when not under systemd or the socket is gone."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when systemd does not watch us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.1, int(usec) / 2e6)
    except ValueError:
        return None
