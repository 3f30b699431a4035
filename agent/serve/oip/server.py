"""The Open Inference Protocol REST endpoint: a bare ASGI app on uvicorn, in one thread of the agent.

Why uvicorn with a raw ASGI app (no framework): measured against aiohttp, uvicorn on h11 and the stdlib's threaded
``http.server`` as bare echo servers with the same client (``benchmarks/http_stacks.py``), uvicorn on httptools was
the fastest and its p50 the lowest; it is small, pure Python apart from httptools (wheels for aarch64, piwheels for
armv7; without it uvicorn falls back to pure-Python h11), and it is the `http` extra, so a device that does not
serve local applications installs none of it.

Why one thread with its own event loop: a slow or stalled client costs a socket and a coroutine, never a thread; a
request's body has ``body_timeout_s`` to arrive (else 408) and at most ``max_connections`` are open (uvicorn answers
503 beyond). Requests go through the agent's one serving path (``Serving.submit`` with a sink): the same queue,
overload policy, limits, micro-batching, telemetry, prediction sums and shadow as MQTT. A fast model is answered on
this loop's thread when nothing is queued (no thread hand-offs), anything else by the serving workers, whose answer
comes back through ``call_soon_threadsafe``.

Errors are OIP error bodies (``{"error": "..."}``) with the typed code in an ``Edgefleet-Error-Code`` header:
bad_request and shape_mismatch 400, unknown_model 404 (also a version that is not the one served), a body over
``serving.max_payload_kb`` 413, a body that did not arrive 408, a compressed body 415, overloaded 503 (the queue is
full; Triton's answer to a full queue) or 429 (this client is past ``serving.client_rps``), deadline_exceeded 503,
internal 500. Each is counted in the serving telemetry like its MQTT twin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent import logs
from agent.errors import InvalidOptions
from agent.runtimes.tensors import TensorSpec
from agent.serve.host import ModelHost
from agent.serve.oip import codec
from agent.serve.serving import Serving
from agent.settings import parse_address
from agent.wire.inference import PayloadError, Request

__all__ = ["OipServer", "STATUS"]

log = logging.getLogger("edgefleet.oip")

STATUS = {"bad_request": 400, "shape_mismatch": 400, "unknown_model": 404, "overloaded": 503, "deadline_exceeded": 503, "internal": 500}
JSON = b"application/json"
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Response = tuple[int, bytes, list[tuple[bytes, bytes]]]


class _HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _error(status: int, code: str, message: str, retry: bool = False) -> Response:
    headers = [(b"content-type", JSON), (b"edgefleet-error-code", code.encode())]
    if retry:
        headers.append((b"retry-after", b"1"))
    return status, codec.error_body(message), headers


class _Answer:
    """One infer request's sink: decodes on the serving thread, resolves the waiting coroutine with the response."""

    __slots__ = ("fut", "header_length", "loop", "outputs", "thread")

    def __init__(self, loop: asyncio.AbstractEventLoop, header_length: int | None, outputs: tuple[TensorSpec, ...]) -> None:
        self.loop, self.header_length, self.outputs = loop, header_length, outputs
        self.fut: asyncio.Future[Response] = loop.create_future()
        self.thread = threading.get_ident()

    def decode(self, payload: bytes, max_bytes: int) -> Request:
        req = codec.decode_infer(payload, self.header_length, max_bytes)
        if req.requested:
            names = {s.name for s in self.outputs}
            for name in req.requested:
                if name not in names:
                    raise PayloadError(f"the model has no output {name!r} (it has {sorted(names)})", req.request_id)
        return req

    def ok(self, req: Request, model: str, version: str, outputs: dict[str, np.ndarray], ms: float) -> None:
        assert isinstance(req, codec.OipRequest)
        try:
            body, head = codec.encode_infer(req, model, version, outputs)
        except (KeyError, ValueError) as exc:  # an output dtype OIP cannot carry; a requested output a hot swap took away
            logs.event(log, "oip.encode_failed", logging.ERROR, model=model, version=version, reason=f"{type(exc).__name__}: {exc}"[:300])
            self._resolve(_error(500, "internal", f"the answer could not be encoded: {type(exc).__name__}: {exc}"[:500]))
            return
        headers = [(b"content-type", JSON if head is None else b"application/octet-stream")]
        if head is not None:
            headers.append((b"inference-header-content-length", str(head).encode()))
        self._resolve((200, body, headers))

    def error(self, req: Request | None, request_id: str, code: str, message: str) -> None:
        self._resolve(_error(STATUS.get(code, 500), code, message, code in ("overloaded", "deadline_exceeded")))

    def refuse(self, message: str, rate_limited: bool) -> None:
        self._resolve(_error(429 if rate_limited else 503, "overloaded", message, True))

    def _resolve(self, response: Response) -> None:
        if threading.get_ident() == self.thread:
            _set(self.fut, response)
        else:
            self.loop.call_soon_threadsafe(_set, self.fut, response)


def _set(fut: asyncio.Future[Response], response: Response) -> None:
    if not fut.done():  # the client went away and the coroutine was cancelled
        fut.set_result(response)


class OipApp:
    """The ASGI application: routes ``/v2/...`` by hand (a handful of paths; no framework in the way)."""

    def __init__(self, serving: Serving, host: ModelHost, ready: Callable[[], bool], body_timeout_s: float) -> None:
        self.serving, self.host, self.ready, self.body_timeout_s = serving, host, ready, body_timeout_s
        self._deadlines = _Deadlines(min(0.25, body_timeout_s / 4))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        try:
            status, body, headers = await self._route(scope, receive)
        except _HttpError as exc:
            status, body, headers = _error(exc.status, exc.code, str(exc))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, scope: Scope, receive: Receive) -> Response:
        parts = scope["path"].strip("/").split("/")
        method = scope["method"]
        if parts[0] != "v2" or len(parts) > 6:
            return self._not_found(scope["path"])
        if method == "POST" and len(parts) >= 4 and parts[1] == "models" and parts[-1] == "infer":
            if len(parts) == 4 or (len(parts) == 6 and parts[3] == "versions"):
                return await self._infer(scope, receive, parts[2], parts[4] if len(parts) == 6 else None)
        if method not in ("GET", "HEAD"):
            return self._not_found(scope["path"], 405 if len(parts) > 1 else 404)
        if len(parts) == 1:
            return 200, codec.server_metadata(), [(b"content-type", JSON)]
        if parts[1] == "health" and len(parts) == 3 and parts[2] in ("live", "ready"):
            ok = parts[2] == "live" or self.ready()
            return (200, b"", []) if ok else _error(503, "overloaded", "not ready: no model loaded yet, or serving stopped")
        if parts[1] == "models" and len(parts) in (3, 4, 5, 6):
            tail = parts[3:]
            version = None
            if tail[:1] == ["versions"] and len(tail) >= 2:
                version, tail = tail[1], tail[2:]
            if tail == []:
                return self._metadata(parts[2], version)
            if tail == ["ready"]:
                self._model(parts[2], version)
                return 200, b"", []
        return self._not_found(scope["path"])

    def _not_found(self, path: str, status: int = 404) -> Response:
        self.serving.stats.error("", None, "bad_request")
        what = "not allowed on" if status == 405 else "no such endpoint:"
        return _error(status, "bad_request", f"{what} {path[:200]}")

    def _model(self, name: str, version: str | None) -> Any:
        """The served model ``name`` (of ``version`` when given), or a 404 counted as unknown_model."""
        m = self.host.get(name)
        if m is None or (version is not None and version != m.version):
            self.serving.stats.error(name, None if m is None else m.version, "unknown_model")
            detail = "" if m is None or version is None else f" version {version!r} (it serves {m.version!r})"
            raise _HttpError(404, "unknown_model", f"no model {name[:64]!r}{detail} on this device")
        return m

    def _metadata(self, name: str, version: str | None) -> Response:
        m = self._model(name, version)
        rt = m.runtime
        return 200, codec.model_metadata(m.name, m.version, rt.name, rt.inputs, rt.outputs), [(b"content-type", JSON)]

    async def _infer(self, scope: Scope, receive: Receive, name: str, version: str | None) -> Response:
        m = self._model(name, version)
        headers = dict(scope["headers"])
        try:
            limit = self.serving.max_payload_bytes
            if headers.get(b"content-encoding", b"identity") != b"identity":
                raise _HttpError(415, "bad_request", "compressed request bodies are not accepted (send Content-Encoding: identity)")
            header_length = _header_length(headers.get(b"inference-header-content-length"))
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise _HttpError(413, "bad_request", f"body of {int(declared)} bytes is over the {limit}-byte limit")
            body = await self._body(receive, limit)
        except _HttpError as exc:
            self.serving.stats.error(name, m.version, exc.code)
            logs.event(log, "oip.refused", logging.WARNING, model=name, status=exc.status, reason=str(exc)[:300])
            raise
        loop = asyncio.get_running_loop()
        answer = _Answer(loop, header_length, m.runtime.outputs)
        self.serving.submit(name, body, 1, _client(scope), answer)
        return answer.fut.result() if answer.fut.done() else await answer.fut  # done: answered inline, on this thread

    async def _body(self, receive: Receive, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes, within ``body_timeout_s`` (``_Deadlines``: 408 past it)."""
        task = asyncio.current_task()
        assert task is not None
        deadlines = self._deadlines
        deadlines.watch(task, self.body_timeout_s)
        chunks: list[bytes] = []
        total, more = 0, True
        try:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _HttpError(400, "bad_request", "the client went away before its body arrived")
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > limit:
                    raise _HttpError(413, "bad_request", f"body over the {limit}-byte limit")
                chunks.append(chunk)
                more = message.get("more_body", False)
        except asyncio.CancelledError:
            if not deadlines.expired(task):
                raise  # the server is stopping
            if hasattr(task, "uncancel"):  # 3.11+: this cancellation is handled here
                task.uncancel()
            raise _HttpError(408, "bad_request", f"the body did not arrive within {self.body_timeout_s:g} s") from None
        finally:
            deadlines.forget(task)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Deadlines:
    """Cancels the tasks still reading a body past their deadline: one timer for all of them, armed only while any read.

    Why not a timer per request (``call_later`` + ``cancel``, or ``asyncio.wait_for``, which wraps every ``receive()``
    in a task before Python 3.12): each cost more than the rest of reading a small body, and cancelled timers stay in
    the loop's heap until they come due — at thousands of requests a second, tens of thousands of them. A deadline is
    kept within ``granularity`` seconds late, never early."""

    def __init__(self, granularity: float = 0.25) -> None:
        self.granularity = granularity
        self._due: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._armed = False

    def watch(self, task: asyncio.Task[Any], seconds: float) -> None:
        loop = task.get_loop()
        self._due[task] = loop.time() + seconds
        if not self._armed:
            self._armed = True
            loop.call_later(min(self.granularity, seconds), self._sweep, loop)

    def forget(self, task: asyncio.Task[Any]) -> None:
        self._due.pop(task, None)
        self._expired.discard(task)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        return task in self._expired

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task in [t for t, due in self._due.items() if due <= now]:
            del self._due[task]
            self._expired.add(task)
            task.cancel()
        if self._due:
            loop.call_later(self.granularity, self._sweep, loop)
        else:
            self._armed = False


def _header_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or len(value) > 12:
        raise _HttpError(400, "bad_request", "Inference-Header-Content-Length must be a number of bytes")
    return int(value)


def _client(scope: Scope) -> str:
    """The rate limiter's key: the peer's address (every local application on one host shares it; a unix socket: one)."""
    peer = scope.get("client")
    return f"http:{peer[0]}" if peer else "http:unix"


class OipServer:
    """Binds ``address`` ("HOST:PORT" or "unix:/path") and serves ``OipApp`` on uvicorn in its own thread."""

    def __init__(
        self,
        address: str,
        serving: Serving,
        host: ModelHost,
        max_connections: int = 256,
        body_timeout_s: float = 10.0,
    ) -> None:
        self.address = address
        self.app = OipApp(serving, host, lambda: serving.healthy() and bool(host.models()), body_timeout_s)
        self.max_connections = max_connections
        self.port: int | None = None  # the bound TCP port (the one asked for, or the one given for port 0)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> OipServer:
        try:
            import uvicorn
        except ImportError:
            raise InvalidOptions("serving.http needs the `http` extra: pip install 'edgefleet[http]' (uvicorn, httptools)") from None
        sock = _bind(self.address)
        if sock.family != socket.AF_UNIX:
            self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            http=_http_impl(self.app.serving),
            loop="asyncio",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            limit_concurrency=self.max_connections,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=2,
            server_header=False,
            date_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="oip-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise InvalidOptions(f"serving.http: the endpoint on {self.address} did not start")
            time.sleep(0.01)
        logs.event(log, "oip.started", address=self.url())
        return self

    def url(self) -> str:
        """``http://HOST:PORT`` for TCP; for a unix socket ``unix:/path`` (clients that speak HTTP over it)."""
        if self.address.startswith("unix:"):
            return self.address
        host, _ = parse_address(self.address, listen=True)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self.address.startswith("unix:"):
            with contextlib.suppress(OSError):
                os.unlink(self.address[5:])


MAX_HEAD_BYTES = 64 * 1024  # request line and headers; beyond: 431 and the connection closed


def _http_impl(serving: Serving) -> Any:
    """uvicorn's httptools protocol with a cap on the request head, or its h11 one (which caps heads itself, 16 KiB).

    Why a cap of our own: httptools hands uvicorn the URL and each header whole, so it buffers them without bound — a
    local client sending one endless header line grew the agent by 200 MB in a second (measured). Counted per read
    (at most 256 KiB): a head is refused past MAX_HEAD_BYTES plus up to two reads."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "h11"

    class CappedHead(HttpToolsProtocol):  # type: ignore[misc]
        _in_head, _head_bytes, _completed = True, 0, False

        def data_received(self, data: bytes) -> None:
            self._completed = False
            super().data_received(data)
            if not self._in_head:
                return
            if self._completed:  # a request ended in this chunk and the next one's head began: count from the next read
                self._head_bytes = 0
                return
            self._head_bytes += len(data)  # the whole chunk lay inside one request head (httptools holds it)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                serving.stats.error("", None, "bad_request")
                logs.event(log, "oip.head_too_large", logging.WARNING, client=str(self.client), bytes=self._head_bytes)
                self.transport.write(_HEAD_TOO_LARGE)
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._completed = True, True  # what follows is the next request's head

    return CappedHead


_HEAD_BODY = codec.error_body(f"request line and headers over {MAX_HEAD_BYTES} bytes")
_HEAD_TOO_LARGE = b"\r\n".join(
    [
        b"HTTP/1.1 431 Request Header Fields Too Large",
        b"content-type: application/json",
        b"edgefleet-error-code: bad_request",
        b"connection: close",
        b"content-length: " + str(len(_HEAD_BODY)).encode(),
        b"",
        _HEAD_BODY,
    ]
)


def _bind(address: str) -> socket.socket:
    """A listening socket: TCP with proto IPPROTO_TCP (asyncio sets TCP_NODELAY only then: without it a response
    in two segments waited 40 ms for a delayed ACK), or a unix socket (a stale one from a killed agent replaced)."""
    if address.startswith("unix:"):
        path = Path(address[5:])
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise InvalidOptions(f"serving.http: {path} exists and is not a socket")
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o660)  # the agent's user and group: local applications join the group
    else:
        host, port = parse_address(address, listen=True)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise InvalidOptions(f"serving.http: cannot listen on {address}: {exc}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock
