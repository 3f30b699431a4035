"""``fleet serve --http :8080``: one page, no build step — devices, rollouts, latency and errors per model version.

The page (``dashboard.html``, plain HTML and JavaScript) polls ``/api/state`` every
second; this module answers it from the store. Read-only: nothing on the page changes
the fleet.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from fleet.store import FleetStore

__all__ = ["Dashboard", "state"]


def state(store: FleetStore, window_s: float = 600.0) -> dict[str, Any]:
    """Everything the page shows, as JSON."""
    rollouts = []
    for r in store.rollouts()[-10:]:
        waves: dict[int, dict[str, int]] = {}
        for m in store.rollout_devices(r["id"]):
            w = waves.setdefault(m["wave"], {})
            w[m["state"]] = w.get(m["state"], 0) + 1
        spec = r["spec"]
        rollouts.append(
            {
                "id": r["id"],
                "model": spec["model"],
                "version": spec["version"],
                "state": r["state"],
                "phase": r["phase"],
                "reason": r["reason"],
                "wave": r["wave"],
                "waves": [waves[k] for k in sorted(waves)],
            }
        )
    devices = [
        {"id": d.id, "online": d.online, "hardware": d.hardware, "models": d.models, "tags": d.tags, "last_seen": d.last_seen}
        for d in store.devices()
    ]
    return {"now": time.time(), "devices": devices, "rollouts": rollouts, "series": store.series(time.time() - window_s)}


class Dashboard:
    def __init__(self, store: FleetStore, host: str = "127.0.0.1", port: int = 8080) -> None:
        page = resources.files("fleet").joinpath("dashboard.html").read_bytes()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", page)
                elif self.path == "/api/state":
                    self._send(200, "application/json", json.dumps(state(store)).encode())
                else:
                    self._send(404, "text/plain", b"not found")

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per poll would drown the controller's log

        self.server = ThreadingHTTPServer((host, port), Handler)
        bound_port = int(self.server.server_address[1])
        self.address = f"{host}:{bound_port}"
        self.url = f"http://{host}:{bound_port}/"
        self._thread = threading.Thread(target=self.server.serve_forever, name="dashboard", daemon=True)

    def start(self) -> Dashboard:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
