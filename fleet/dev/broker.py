"""Start and stop a local MQTT broker: mosquitto when installed, else the pure-Python amqtt.

Why here and not only in the tests: ``fleet demo`` needs exactly the same thing
the tests need — a private broker on a free loopback port, with a generated
config, stopped by its pid — so both use this module.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["RunningBroker", "BrokerStartError", "free_port", "start_broker", "mosquitto_binary"]

BrokerKind = Literal["mosquitto", "amqtt"]


class BrokerStartError(RuntimeError):
    """The broker process exited or never accepted connections; the message has its log tail."""


LISTEN_PORTS_FROM = 10000  # free_port's ports: from here up to where the kernel's ephemeral range begins


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, for a server started a moment later (a broker, an agent's endpoint).

    Why not the kernel's ``bind(port 0)`` choice: that comes from the ephemeral range, which every outgoing connection
    draws from too, so between this call and the server's own bind a client's socket can take the port (a demo agent
    then exits "cannot listen"). A port below that range is never handed to a client; drawn at random, checked free
    (on ``::1`` too for 127.0.0.1: a client of "localhost" may reach either), never the same twice in one process.
    Where the range leaves no room below it, the kernel's choice after all."""
    low = _ephemeral_low()
    for _ in range(50 if low > LISTEN_PORTS_FROM + 1000 else 0):
        port = random.randrange(LISTEN_PORTS_FROM, low)
        if port not in _handed_out and _bindable(host, port):
            _handed_out.add(port)
            return port
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_handed_out: set[int] = set()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bindable(host: str, port: int) -> bool:
    try:
        with socket.socket(_family(host)) as s:
            s.bind((host, port))
    except OSError:
        return False
    if host == "127.0.0.1" and socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", port))
        except OSError as exc:
            return exc.errno != errno.EADDRINUSE  # no IPv6 loopback here (EADDRNOTAVAIL): nothing listens there
    return True


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; elsewhere the IANA range's 49152)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


@dataclass
class RunningBroker:
    kind: BrokerKind
    host: str
    port: int
    workdir: Path
    config: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.kind}.log"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by pid, then SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def start_again(self, timeout: float = 10.0) -> None:
        """Restart on the same port with the same config (for outage tests)."""
        self.stop()
        self.process = _spawn(self.kind, self.config, self.log_path)
        _wait_ready(self, timeout)

    def __enter__(self) -> RunningBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _mosquitto_config(port: int, host: str, workdir: Path, extra: list[str]) -> str:
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "persistence false",
        "set_tcp_nodelay true",
        # The default (1000) silently drops QoS 1 messages past the queue; see DESIGN.md.
        "max_queued_messages 10000",
        f"log_dest file {workdir / 'mosquitto.log'}",
        # Started as root, mosquitto switches to the `mosquitto` user, which cannot read the private (0700)
        # working directory: its log, or a test's password file and keys. This broker is private; keep the user.
        *(["user root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        "log_type error",
        "log_type warning",
        "log_type notice",
        *extra,
    ]
    return "\n".join(lines) + "\n"


def _amqtt_config(port: int, host: str) -> str:
    return (
        "listeners:\n"
        "  default:\n"
        "    type: tcp\n"
        f"    bind: {host}:{port}\n"
        "plugins:\n"
        "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
        "    allow_anonymous: true\n"
    )


def _spawn(kind: BrokerKind, config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        if kind == "mosquitto":
            binary = mosquitto_binary()
            if binary is None:
                raise BrokerStartError("mosquitto is not installed")
            cmd = [binary, "-c", str(config)]
        else:
            cmd = [sys.executable, "-c", "from amqtt.scripts.broker_script import main; main()", "-c", str(config)]
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_ready(broker: RunningBroker, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker.process.poll() is not None:
            tail = broker.log_path.read_text(errors="replace")[-2000:] if broker.log_path.exists() else ""
            raise BrokerStartError(f"{broker.kind} exited with {broker.process.returncode}: {tail}")
        try:
            with socket.create_connection((broker.host, broker.port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    broker.stop()
    raise BrokerStartError(f"{broker.kind} did not accept connections on {broker.host}:{broker.port} within {timeout}s")


def start_broker(
    workdir: Path,
    port: int | None = None,
    host: str = "127.0.0.1",
    prefer: BrokerKind = "mosquitto",
    extra_config: list[str] | None = None,
    timeout: float = 15.0,
) -> RunningBroker:
    """A broker on ``host:port`` (a free port by default) with a config generated in ``workdir``.

    ``prefer="mosquitto"`` falls back to amqtt when no mosquitto binary exists;
    ``extra_config`` lines are mosquitto-only (TLS, ACLs) and refused for amqtt.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    kind: BrokerKind = prefer if prefer == "amqtt" or mosquitto_binary() else "amqtt"
    if kind == "amqtt" and extra_config:
        raise BrokerStartError("extra mosquitto config lines need mosquitto, which is not installed")
    attempts = 1 if port else 3  # a free port can be taken between the probe and the bind
    last: BrokerStartError | None = None
    for _ in range(attempts):
        p = port or free_port(host)
        config = workdir / ("mosquitto.conf" if kind == "mosquitto" else "amqtt.yaml")
        text = _mosquitto_config(p, host, workdir, extra_config or []) if kind == "mosquitto" else _amqtt_config(p, host)
        config.write_text(text)
        log = workdir / f"{kind}.log"
        broker = RunningBroker(kind, host, p, workdir, config, _spawn(kind, config, log))
        try:
            _wait_ready(broker, timeout)
            return broker
        except BrokerStartError as exc:
            last = exc
    assert last is not None
    raise last
