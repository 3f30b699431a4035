"""The leader takes over the ingest sessions of controllers that died, so that their share of the telemetry is stored.

Why: with the ingest split by an MQTT 5 shared subscription, the broker (mosquitto 2.0.11, measured) goes on
handing every member its share while the member is away, queued in its persistent session, and sends the
messages it had not acknowledged to that session again — never to the other members. A controller restarted
under its id (``controller_id``) gets all of it back; one that does not come back would hold its share until the
session expires (``QUEUED_SESSION_S``) or the broker's queue limit drops it. So the leader checks every few seconds
which registered controllers (the store's ``controllers``) no longer hold their identity lock (``fleet.leader.identity``:
dead, whatever the reason) and connects as each of them (``Ingestor(adopted=True)``): it unsubscribes the session from
the group (the broker stops giving a dead member a share) and receives, stores and acknowledges what the session held —
queued, or sent and never acknowledged. When the owner comes back, the broker hands the session to it (the owner
subscribes again) and the adopter ends without reconnecting (it would take it back). Only the leader adopts,
so two controllers never fight over one session; a new leader adopts again (the old one's adoptions died with it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent import logs
from fleet.leader import Leadership, identity
from fleet.store import FleetStore, StoreLocation
from fleet.transport.ingest import Ingestor

__all__ = ["Adoptions"]

log = logging.getLogger("edgefleet.controller")


class Adoptions:
    """The sessions this (leading) controller holds for dead ones. ``make`` builds an adopting ``Ingestor`` for a
    client id (the controller's own settings: broker, group, store)."""

    def __init__(self, store: FleetStore, location: StoreLocation, own_id: str, make: Callable[[str], Ingestor]) -> None:
        self.store, self.location, self.own_id, self._make = store, location, own_id, make
        self.held: dict[str, Ingestor] = {}  # controller id -> the adopter holding its session
        self._probes: dict[str, Leadership] = {}

    def check(self) -> list[str]:
        """Adopt every registered controller found dead; drop adoptions whose owner took its session back. The ids
        newly adopted."""
        adopted = []
        for row in self.store.controllers():
            cid = str(row["id"])
            if cid == self.own_id:
                continue
            held = self.held.get(cid)
            if held is not None:
                if held.ended.is_set():  # the owner is back: its session is its own again
                    held.stop()
                    del self.held[cid]
                continue
            probe = self._probes.setdefault(cid, identity(self.location, cid))
            if probe.holder_alive():
                continue
            try:
                self.held[cid] = self._make(str(row["client_id"])).start()
            except (OSError, ConnectionError) as exc:  # the broker away: tried again next round
                logs.event(log, "ingest.adoption_failed", logging.WARNING, controller=cid, reason=str(exc)[:200])
                continue
            adopted.append(cid)
            logs.event(log, "ingest.adopted", controller=cid, client_id=row["client_id"])
        return adopted

    def stop(self) -> None:
        """Give every adopted session up (stored and acknowledged what arrived; the sessions stay for the next leader)."""
        for ingest in self.held.values():
            ingest.stop()
        self.held.clear()
        for probe in self._probes.values():
            probe.release()
        self._probes.clear()
