"""Which HTTP server library the agent's Open Inference Protocol endpoint is built on: a bare echo on each, raced.

Each contender is an echo server in its own process (POST → the body back, 200, the request's content type): the
HTTP stack's own cost, nothing of ours. The client is the same for all (``benchmarks.http_client``: geventhttpclient,
tritonclient's transport), with a window of requests in flight for requests/s and one at a time for p50, in
alternating rounds; ratios are against the stdlib ``http.server`` (threads), the baseline every Python has.

Run: ``python -m benchmarks.http_stacks [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import machine, write
from benchmarks.http_client import HttpLoad, p50, pair_ratios, summary

SERVERS = {
    "stdlib http.server": r"""
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", self.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def log_message(self, *a):
        pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
s.daemon_threads = True
print("ready", s.server_address[1], flush=True)
s.serve_forever()
""",
    "aiohttp": r"""
import asyncio, socket
from aiohttp import web
async def echo(request):
    return web.Response(body=await request.read(), content_type=request.content_type)
async def main():
    app = web.Application()
    app.router.add_post("/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP); sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    print("ready", sock.getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
""",
    "uvicorn + httptools (raw ASGI)": r"""
import socket, sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        m = await receive(); body += m.get("body", b""); more = m.get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only on proto TCP
sock.bind(("127.0.0.1", 0))
print("ready", sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, http=sys.argv[1], log_level="warning", access_log=False, lifespan="off")).run(sockets=[sock])
""",
}
SERVERS["uvicorn + h11 (raw ASGI)"] = SERVERS["uvicorn + httptools (raw ASGI)"]
ARGS = {"uvicorn + httptools (raw ASGI)": ["httptools"], "uvicorn + h11 (raw ASGI)": ["h11"]}


def start(name: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVERS[name], *ARGS.get(name, [])], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    word, port = proc.stdout.readline().split()
    assert word == "ready"
    return proc, int(port)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_tp, n_lat, window, rounds = (1000, 200, 16, 4) if args.quick else (4000, 1000, 16, 6)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.25] * 64}]}).encode()
    procs = {name: start(name) for name in SERVERS}
    loads = {name: HttpLoad("127.0.0.1", port, window) for name, (_, port) in procs.items()}
    rps: dict[str, list[float]] = {n: [] for n in SERVERS}
    lat: dict[str, list[float]] = {n: [] for n in SERVERS}
    try:
        for load in loads.values():
            load.run("/v2/models/m/infer", body, 200, window)  # warm up
        for r in range(rounds):
            order = list(SERVERS) if r % 2 == 0 else list(reversed(SERVERS))
            for name in order:
                rps[name].append(loads[name].run("/v2/models/m/infer", body, n_tp, window)[0])
                lat[name].append(p50(loads[name].run("/v2/models/m/infer", body, n_lat, 1)[1]))
    finally:
        for load in loads.values():
            load.close()
        for proc, _ in procs.values():
            proc.terminate()
    base = "stdlib http.server"
    rows = [{"stack": n, **summary(rps[n], lat[n]), "rps_vs_stdlib": pair_ratios(rps[n], rps[base])} for n in SERVERS]
    _report(rows, window, n_tp, rounds)


def _report(rows: list[dict[str, Any]], window: int, n: int, rounds: int) -> None:
    header = ["stack", "req/s (median)", "spread", "vs stdlib (median, spread)", "p50 ms", "p50 spread"]
    table = Table(title=f"bare HTTP echo per server library ({n} requests, window {window}, {rounds} alternating rounds)")
    for h in header:
        table.add_column(h)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        ratio = r["rps_vs_stdlib"]
        cells = [
            r["stack"],
            str(r["rps"]),
            f"{r['rps_spread'][0]}..{r['rps_spread'][1]}",
            f"{ratio['median']:.2f} ({ratio['spread'][0]:.2f}..{ratio['spread'][1]:.2f})",
            f"{r['p50_ms']:.3f}",
            f"{r['p50_spread_ms'][0]:.3f}..{r['p50_spread_ms'][1]:.3f}",
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console().print(table)
    meta = {"machine": machine(), "window": window, "requests": n, "rounds": rounds, "rows": rows}
    paths = write("http_stacks", meta, "\n".join(md) + "\n")
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
