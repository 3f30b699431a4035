"""Tell devices that their director metadata changed: each device's signed director timestamp, retained.

Why here and not in the controller: ``fleet serve``'s re-signing, the rollout engine and ``fleet assign`` all
announce, and the engine must not import the controller that runs it. The message is only a hint: a device
that sees it (now, or when it connects later: it is retained on ``dev/{id}/director/timestamp``) fetches and
verifies everything through the repository server, and never trusts the message by itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from agent import logs
from agent.settings import BrokerSettings
from agent.wire import WireError, device_topic, valid_device_id
from fleet.transport import client as transport
from fleet.tuf.director import Director

__all__ = ["announce"]

log = logging.getLogger("edgefleet.controller")  # the controller's log: announcing is part of its work


def announce(
    director: Director,
    device_ids: Iterable[str],
    host: str | None = None,
    port: int | None = None,
    timeout: float = 10.0,
    broker: BrokerSettings | None = None,
) -> None:
    """Publish each device's current signed director timestamp, retained, so the device checks for an update.

    ``broker``: TLS, credentials, MQTT version (fleet.toml's ``[broker]``); ``host``/``port`` replace its address.
    """
    b = transport.broker_settings(host, port, broker)
    c = transport.client(b, f"edgefleet-announce-{time.monotonic_ns() % 10**9}")
    transport.connect(c, b)
    c.loop_start()
    try:
        infos = []
        devices = list(device_ids)
        timestamps = director.timestamps([d for d in devices if _valid(d)])
        for device in devices:
            try:
                if device in timestamps:
                    infos.append(c.publish(device_topic(device, "director", "timestamp"), timestamps[device], qos=1, retain=True))
            except (WireError, OSError) as exc:  # one device's trouble is not everyone's: the others are still told
                logs.event(log, "announce.failed", logging.ERROR, device=str(device)[:80], reason=str(exc)[:200])
        for info in infos:
            info.wait_for_publish(timeout)
    finally:
        c.disconnect()
        c.loop_stop()


def _valid(device: str) -> bool:
    try:
        valid_device_id(device)
        return True
    except WireError as exc:  # one device's trouble is not everyone's: the others are still told
        logs.event(log, "announce.failed", logging.ERROR, device=str(device)[:80], reason=str(exc)[:200])
        return False
