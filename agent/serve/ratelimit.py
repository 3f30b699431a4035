"""Per-client token buckets for serving: one application's flood is answered ``overloaded``, not queued ahead of others.

Who a client is comes from the request *topic* (``dev/{id}/infer/{model}/{client}``), which the generated broker ACL
lets each application publish only under its own name; a payload's claims (its ``reply_to``) are never the key, or
one application could drain another's bucket. Requests on the two-level topic share one anonymous bucket.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

__all__ = ["ClientBuckets"]


class ClientBuckets:
    """``rate`` requests a second per client, bursts of ``burst``; at most ``max_clients`` remembered (least recent go)."""

    def __init__(self, rate: float, burst: float, max_clients: int = 10_000) -> None:
        self.rate, self.burst, self.max_clients = rate, max(burst, 1.0), max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> bool:
        """One request's token for ``client``: False when its bucket is empty (answer ``overloaded``). rate 0: no limit."""
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return allowed
