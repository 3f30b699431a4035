"""``fleet serve --http :8080``: one page, no build step — devices, rollouts, latency and errors per model version.

The page (``dashboard.html``, plain HTML and JavaScript) polls ``/api/state`` every
second; this module answers it from the store. Read-only: nothing on the page changes
the fleet.

Who may read it: with only a port (``--http :8080``) it listens on 127.0.0.1. Any other address needs a bearer
token (``dashboard.token`` in fleet.toml; ``fleet serve`` makes one on first use): every request, the page included,
must carry ``Authorization: Bearer TOKEN`` or is answered 401. A browser, which cannot add that header to a page
load, may send the token as the password of HTTP Basic authentication instead (any user name): it asks once and
then sends it with the page's own requests.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import InvalidOptions
from fleet.metrics import CONTENT_TYPE, FleetMetrics
from fleet.settings import DEFAULT_CONFIG, is_loopback, parse_bind, save_dashboard_token
from fleet.store import FleetStore

# Requests that read the store (the page's state, /metrics) at once; the rest wait their turn in their own HTTP thread.
# On PostgreSQL each such read holds a pooled connection, and the pool is shared with the ingest and the repository
# readers: a dashboard polled from many browsers must queue here, not take the connections the devices need.
STORE_READERS = 4

if TYPE_CHECKING:
    from fleet.controller import Controller

__all__ = ["Dashboard", "authorized", "serve_dashboard", "state"]


def state(store: FleetStore, window_s: float = 600.0) -> dict[str, Any]:
    """Everything the page shows, as JSON."""
    rollouts = []
    for r in store.rollouts()[-10:]:
        waves: dict[int, dict[str, int]] = {}
        for m in store.rollout_devices(r.id):
            w = waves.setdefault(m.wave, {})
            w[m.state] = w.get(m.state, 0) + 1
        spec = r.spec
        rollouts.append(
            {
                "id": r.id,
                "model": spec["model"],
                "version": spec["version"],
                "state": r.state,
                "phase": r.phase,
                "reason": r.reason,
                "wave": r.wave,
                "waves": [waves[k] for k in sorted(waves)],
            }
        )
    devices = [
        {"id": d.id, "online": d.online, "hardware": d.hardware, "models": d.models, "tags": d.tags, "last_seen": d.last_seen}
        for d in store.devices()
    ]
    return {"now": time.time(), "devices": devices, "rollouts": rollouts, "series": store.series(time.time() - window_s)}


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token``: ``Bearer TOKEN``, or ``Basic`` with TOKEN as the password."""
    scheme, _, value = (header or "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), token.encode())  # constant time: no guessing it byte by byte


class Dashboard:
    """Serves the page, ``/api/state`` and ``/metrics`` (Prometheus, ``fleet.metrics``: the store's aggregates, and
    ``controller``'s own counters when given); ``token`` (required for any non-loopback ``host``) guards every request."""

    def __init__(
        self, store: FleetStore, host: str = "127.0.0.1", port: int = 8080, token: str | None = None, controller: Controller | None = None
    ) -> None:
        if token is None and not is_loopback(host):
            raise InvalidOptions(f"dashboard on {host}:{port}: an address other than loopback needs a token (dashboard.token)")
        page = resources.files("fleet").joinpath("dashboard.html").read_bytes()
        metrics = FleetMetrics(store, controller)
        readers = threading.BoundedSemaphore(STORE_READERS)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if token is not None and not authorized(self.headers.get("Authorization"), token):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Bearer realm="edgefleet"')
                    self.send_header("WWW-Authenticate", 'Basic realm="edgefleet dashboard: the token is the password"')
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", "13")
                    self.end_headers()
                    self.wfile.write(b"unauthorized\n")
                elif self.path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", page)
                elif self.path == "/api/state":
                    with readers:
                        body = json.dumps(state(store)).encode()
                    self._send(200, "application/json", body)
                elif self.path.split("?", 1)[0] == "/metrics":
                    self._metrics()
                else:
                    self._send(404, "text/plain", b"not found")

            def _metrics(self) -> None:
                try:
                    with readers:
                        body = metrics.render()
                except ImportError:
                    self._send(503, "text/plain", b"/metrics needs prometheus-client: pip install 'edgefleet[controller]'\n")
                    return
                self._send(200, CONTENT_TYPE, body)

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per poll would drown the controller's log

        server_class = ThreadingHTTPServer
        if ":" in host:  # an IPv6 address

            class _V6(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            server_class = _V6
        self.server = server_class((host, port), Handler)
        self.token = token
        bound_port = int(self.server.server_address[1])
        name = f"[{host}]" if ":" in host else host
        self.address = f"{name}:{bound_port}"
        self.url = f"http://{name}:{bound_port}/"
        self._thread = threading.Thread(target=self.server.serve_forever, name="dashboard", daemon=True)

    def start(self) -> Dashboard:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_dashboard(
    store: FleetStore, address: str, token: str | None = None, config: Path = DEFAULT_CONFIG, controller: Controller | None = None
) -> tuple[Dashboard, str | None]:
    """The dashboard on ``address`` (``[HOST]:PORT``; a port alone is 127.0.0.1), started, and a token made now or None.

    An address other than loopback with no ``token`` gets a new one, kept in ``config`` as ``dashboard.token`` so the
    next start uses it; the caller shows it once (it is nowhere else in the clear but that file).
    """
    try:
        host, port = parse_bind(address)
    except ValueError as exc:
        raise InvalidOptions(f"dashboard address: {exc}") from None
    new = None
    if token is None and not is_loopback(host):
        token = new = save_dashboard_token(config)
    return Dashboard(store, host, port, token, controller).start(), new
