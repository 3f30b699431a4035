"""The HTTP load generator shared by benchmarks/http_stacks.py and the OIP rows of benchmarks/serving.py.

Why geventhttpclient: it is the transport of ``tritonclient.http`` (the client local applications use), its
parser is C, and its greenlets keep a window of requests in flight without Python threads, so the client is
cheap next to the server it measures. Every contender gets the same client, the same body and the same window.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np


class HttpLoad:
    """Keep-alive connections to one server; ``run`` posts ``n`` bodies with ``window`` in flight."""

    def __init__(self, host: str, port: int, window: int) -> None:
        from geventhttpclient import HTTPClient

        self.client = HTTPClient(host, port, concurrency=max(1, window), connection_timeout=10, network_timeout=30)
        self.window = window

    def _one(self, path: str, body: bytes, headers: dict[str, str]) -> float:
        t0 = time.perf_counter()
        resp = self.client.post(path, body=body, headers=headers)
        resp.read()
        if resp.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {resp.status_code}")
        return (time.perf_counter() - t0) * 1e3

    def run(self, path: str, body: bytes, n: int, window: int, headers: dict[str, str] | None = None) -> tuple[float, list[float]]:
        """(requests per second, per-request round trips in ms) for ``n`` requests with ``window`` in flight."""
        import gevent.pool

        h = {"Content-Type": "application/json", **(headers or {})}
        pool = gevent.pool.Pool(window)
        t0 = time.perf_counter()
        jobs = [pool.spawn(self._one, path, body, h) for _ in range(n)]
        pool.join(raise_error=True)
        elapsed = time.perf_counter() - t0
        return n / elapsed, [j.value for j in jobs]

    def close(self) -> None:
        self.client.close()


def summary(rps: list[float], p50: list[float]) -> dict[str, Any]:
    """The median of rounds and their spread (min..max)."""
    return {
        "rps": round(statistics.median(rps)),
        "rps_spread": [round(min(rps)), round(max(rps))],
        "p50_ms": round(statistics.median(p50), 3),
        "p50_spread_ms": [round(min(p50), 3), round(max(p50), 3)],
    }


def pair_ratios(a: list[float], b: list[float]) -> dict[str, Any]:
    """Round-by-round ratios a/b: their median and spread (each pair ran back to back, so drift cancels)."""
    r = [x / y for x, y in zip(a, b)]
    return {"median": round(statistics.median(r), 3), "spread": [round(min(r), 3), round(max(r), 3)]}


def p50(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 50))
