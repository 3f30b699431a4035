"""The Open Inference Protocol gRPC endpoint (KServe v2 ``inference.GRPCInferenceService``) on grpcio: the `grpc` extra.

Why grpcio: the protocol's reference implementation, kept by the gRPC project, wheels for x86_64 and aarch64 (piwheels
for armv7); a device that does not want it installs none of it (about 19 MB). Its messages are built at import
(``grpc_messages``), so no generated code ties it to one protobuf release.

Same serving path as REST and MQTT: a ``ModelInfer`` call is parsed on the endpoint's event loop, its model looked up,
and handed to ``Serving.submit`` with a sink; the queue, overload policy, rate limit, micro-batching, telemetry,
prediction sums, shadow and ``publish_predictions`` are the ones every request sees. A fast model is answered on the
loop's thread when nothing is queued; otherwise a serving worker answers and the call's coroutine awaits it.

Errors are gRPC statuses with the typed code in the ``edgefleet-error-code`` trailing metadata: bad_request and
shape_mismatch INVALID_ARGUMENT, unknown_model NOT_FOUND (also a version that is not the one served), overloaded
UNAVAILABLE (the queue is full) or RESOURCE_EXHAUSTED (this client is past ``serving.client_rps``), deadline_exceeded
DEADLINE_EXCEEDED, internal INTERNAL. A message over ``serving.max_payload_kb`` is refused by grpc itself
(RESOURCE_EXHAUSTED), beyond ``grpc_max_rpcs`` calls at once too. The client's own gRPC deadline bounds the time the
request may wait in the queue, as the ``timeout`` parameter does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__, logs
from agent.errors import InvalidOptions
from agent.runtimes.tensors import TensorSpec
from agent.serve.host import ModelHost
from agent.serve.oip import grpc_codec
from agent.serve.oip.codec import OipRequest, tensor_metadata
from agent.serve.oip.grpc_messages import SERVICE, messages
from agent.serve.serving import Serving
from agent.wire.inference import PayloadError, Request

__all__ = ["OipGrpcServer"]

log = logging.getLogger("edgefleet.oip")

MAX_DEADLINE_S = 3600.0  # a client deadline further away than this is no deadline (the timeout parameter's limit)


def _status(code: str, rate_limited: bool = False) -> Any:
    import grpc

    if rate_limited:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return {
        "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
        "shape_mismatch": grpc.StatusCode.INVALID_ARGUMENT,
        "unknown_model": grpc.StatusCode.NOT_FOUND,
        "overloaded": grpc.StatusCode.UNAVAILABLE,
        "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    }.get(code, grpc.StatusCode.INTERNAL)


class _Failure(Exception):
    """A call answered with an error status: the typed code, and whether a rate limit refused it."""

    def __init__(self, code: str, message: str, rate_limited: bool = False) -> None:
        super().__init__(message)
        self.code, self.rate_limited = code, rate_limited


class _Answer:
    """One ModelInfer call's sink: the serving path decodes and answers through it; it resolves the waiting coroutine
    (on the event loop's thread directly, from a serving worker through ``call_soon_threadsafe``)."""

    __slots__ = ("fut", "loop", "message", "outputs", "thread")

    def __init__(self, loop: asyncio.AbstractEventLoop, message: Any, outputs: tuple[TensorSpec, ...]) -> None:
        self.loop, self.message, self.outputs = loop, message, outputs
        self.fut: asyncio.Future[bytes] = loop.create_future()
        self.thread = threading.get_ident()

    def decode(self, payload: bytes, max_bytes: int) -> Request:
        req = grpc_codec.decode_infer(self.message)
        names = {s.name for s in self.outputs}
        for name in req.requested or ():
            if name not in names:
                raise PayloadError(f"the model has no output {name!r} (it has {sorted(names)})", req.request_id)
        return req

    def ok(self, req: Request, model: str, version: str, outputs: dict[str, np.ndarray], ms: float) -> None:
        assert isinstance(req, OipRequest)
        try:
            self._resolve(grpc_codec.encode_infer(req, model, version, outputs))
        except (KeyError, ValueError) as exc:  # an output dtype the protocol cannot carry; an output a hot swap took away
            logs.event(log, "oip.encode_failed", logging.ERROR, model=model, version=version, reason=f"{type(exc).__name__}: {exc}"[:300])
            self._resolve(_Failure("internal", f"the answer could not be encoded: {type(exc).__name__}: {exc}"[:500]))

    def error(self, req: Request | None, request_id: str, code: str, message: str) -> None:
        self._resolve(_Failure(code, message))

    def refuse(self, message: str, rate_limited: bool) -> None:
        self._resolve(_Failure("overloaded", message, rate_limited))

    def _resolve(self, outcome: bytes | _Failure) -> None:
        if threading.get_ident() == self.thread:
            _settle(self.fut, outcome)
        else:
            self.loop.call_soon_threadsafe(_settle, self.fut, outcome)


def _settle(fut: asyncio.Future[bytes], outcome: bytes | _Failure) -> None:
    if fut.done():  # the call was cancelled (the client went away, or its deadline passed)
        return
    if isinstance(outcome, _Failure):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)


class _Service:
    """The six RPCs, as coroutines on the endpoint's event loop: bytes in (each parses its own, so malformed bytes are
    a typed refusal), a message or bytes out."""

    def __init__(self, serving: Serving, host: ModelHost) -> None:
        self.serving, self.host = serving, host

    def handlers(self) -> Any:
        import grpc

        def unary(method: Any, request: str, response: str) -> Any:
            parse = messages[request].FromString

            async def parsed(raw: bytes, context: Any) -> Any:
                try:
                    message = parse(raw)
                except Exception as exc:  # upb's DecodeError (invalid UTF-8, nesting past its limit, truncation)
                    self.serving.stats.error("", None, "bad_request")
                    raise _Failure("bad_request", f"not a {request}: {exc}"[:300]) from None
                return method(message)

            return grpc.unary_unary_rpc_method_handler(self._guarded(parsed), response_serializer=messages[response].SerializeToString)

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ServerLive": unary(self.server_live, "ServerLiveRequest", "ServerLiveResponse"),
                "ServerReady": unary(self.server_ready, "ServerReadyRequest", "ServerReadyResponse"),
                "ModelReady": unary(self.model_ready, "ModelReadyRequest", "ModelReadyResponse"),
                "ServerMetadata": unary(self.server_metadata, "ServerMetadataRequest", "ServerMetadataResponse"),
                "ModelMetadata": unary(self.model_metadata, "ModelMetadataRequest", "ModelMetadataResponse"),
                "ModelInfer": grpc.unary_unary_rpc_method_handler(self._guarded(self.model_infer)),  # raw bytes both ways
            },
        )

    def _guarded(self, method: Any) -> Any:
        """``method`` with a ``_Failure`` turned into its status (and trailing code); anything else is INTERNAL, logged."""

        async def call(request: Any, context: Any) -> Any:
            try:
                return await method(request, context)
            except _Failure as failure:
                context.set_trailing_metadata((("edgefleet-error-code", failure.code),))
                await context.abort(_status(failure.code, failure.rate_limited), str(failure)[:1000])
            except asyncio.CancelledError:
                raise  # the client went away or its deadline passed: grpc ends the call
            except Exception as exc:
                if _is_abort(exc):
                    raise
                logs.event(log, "oip.grpc_internal_error", logging.ERROR, reason=f"{type(exc).__name__}: {exc}"[:300])
                context.set_trailing_metadata((("edgefleet-error-code", "internal"),))
                await context.abort(_status("internal"), f"{type(exc).__name__}: {exc}"[:500])

        return call

    def server_live(self, request: Any) -> Any:
        return messages["ServerLiveResponse"](live=True)

    def server_ready(self, request: Any) -> Any:
        return messages["ServerReadyResponse"](ready=self.serving.healthy() and bool(self.host.models()))

    def model_ready(self, request: Any) -> Any:
        m = self.host.get(request.name)
        return messages["ModelReadyResponse"](ready=m is not None and request.version in ("", m.version))

    def server_metadata(self, request: Any) -> Any:
        return messages["ServerMetadataResponse"](name="edgefleet-agent", version=__version__, extensions=[])

    def model_metadata(self, request: Any) -> Any:
        m = self._model(request.name, request.version)
        rt = m.runtime
        response = messages["ModelMetadataResponse"](name=m.name, versions=[m.version], platform=rt.name)
        for specs, field in ((rt.inputs, response.inputs), (rt.outputs, response.outputs)):
            for s in specs:
                field.add(**tensor_metadata(s))
        return response

    async def model_infer(self, raw: bytes, context: Any) -> bytes:
        try:
            message = grpc_codec.parse_infer(raw)
        except PayloadError as exc:
            self.serving.stats.error("", None, "bad_request")
            raise _Failure("bad_request", str(exc)) from None
        m = self._model(message.model_name, message.model_version)
        remaining = context.time_remaining()  # None or "infinite" (about 1e19 s) without a deadline
        if remaining is not None and remaining < MAX_DEADLINE_S and "timeout" not in message.parameters:
            message.parameters["timeout"].int64_param = max(1, int(remaining * 1e6))  # the client's deadline bounds the queue
        answer = _Answer(asyncio.get_running_loop(), message, m.runtime.outputs)
        self.serving.submit(message.model_name, raw, 1, _client(context.peer()), answer)
        return answer.fut.result() if answer.fut.done() else await answer.fut  # done: answered inline, on this thread

    def _model(self, name: str, version: str) -> Any:
        m = self.host.get(name)
        if m is None or version not in ("", m.version):
            self.serving.stats.error(name[:128], None if m is None else m.version, "unknown_model")
            detail = "" if m is None or not version else f" version {version[:64]!r} (it serves {m.version!r})"
            raise _Failure("unknown_model", f"no model {name[:64]!r}{detail} on this device")
        return m


def _is_abort(exc: BaseException) -> bool:
    """grpc.aio's own abort (``context.abort`` raises it to end the call): passed on, never logged as a bug."""
    from grpc.aio import AbortError

    return isinstance(exc, AbortError)


def _client(peer: str) -> str:
    """The rate limiter's key: the peer's address without its port ("ipv4:127.0.0.1:5000" -> "grpc:127.0.0.1")."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"grpc:{rest.rsplit(':', 1)[0]}"
    return "grpc:unix" if kind == "unix" else f"grpc:{kind}"


class OipGrpcServer:
    """Serves the gRPC endpoint on ``address`` ("HOST:PORT" or "unix:/path"): grpc.aio on an event loop in its own thread.

    Why asyncio and not grpc's thread pool: a call waiting for its answer then costs a coroutine, not a thread, so
    the serving queue's bound is what refuses work (UNAVAILABLE, as REST's 503) and health calls never wait behind
    inference; and one thread taking the GIL beats a pool of them contending for it (measured on the tiny model, 16
    calls in flight: 1,700 calls/s with a thread per call the serving path can hold, 2,400 with two threads)."""

    def __init__(self, address: str, serving: Serving, host: ModelHost, max_rpcs: int = 256) -> None:
        self.address, self.serving, self.host, self.max_rpcs = address, serving, host, max_rpcs
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._stopping: Any = None  # the stop's concurrent future, until ``wait``

    def start(self, timeout: float = 10.0) -> OipGrpcServer:
        try:
            import grpc  # noqa: F401 - the extra's presence, checked before a thread starts
        except ImportError:
            raise InvalidOptions("serving.grpc needs the `grpc` extra: pip install 'edgefleet[grpc]' (grpcio, protobuf)") from None
        target = self._target()
        loop = asyncio.new_event_loop()
        started = asyncio.run_coroutine_threadsafe(self._bind(target), loop)
        self._loop, self._thread = loop, threading.Thread(target=loop.run_forever, name="oip-grpc", daemon=True)
        self._thread.start()
        try:
            self.port = started.result(timeout)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout)
            loop.close()
            self._loop = self._thread = None
            raise
        if self.address.startswith("unix:"):
            self.port = None
            os.chmod(self.address[5:], 0o660)  # the agent's user and group: local applications join the group
        logs.event(log, "oip.grpc_started", address=self.url())
        return self

    async def _bind(self, target: str) -> int:
        from grpc import aio

        limit = self.serving.max_payload_bytes + 64 * 1024  # the tensors plus their description
        server = aio.server(
            handlers=[_Service(self.serving, self.host).handlers()],
            maximum_concurrent_rpcs=self.max_rpcs,
            options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)],
        )
        try:
            port = server.add_insecure_port(target)
        except RuntimeError as exc:  # grpcio >= 1.60 raises where older ones returned 0
            raise InvalidOptions(f"serving.grpc: cannot listen on {self.address}: {exc}") from None
        if port == 0 and not self.address.startswith("unix:"):
            raise InvalidOptions(f"serving.grpc: cannot listen on {self.address}")
        await server.start()
        self._server = server
        return int(port)

    def _target(self) -> str:
        if not self.address.startswith("unix:"):
            return self.address
        path = Path(self.address[5:])
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise InvalidOptions(f"serving.grpc: {path} exists and is not a socket")
            path.unlink()  # a stale socket of a killed agent
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"unix:{path}"

    def url(self) -> str:
        """What a client dials: ``HOST:PORT`` (``tritonclient.grpc``'s url) or ``unix:/path``."""
        if self.address.startswith("unix:"):
            return self.address
        host = self.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new calls now; those in flight have ``grace`` seconds (their answers come from ``Serving.stop``,
        which runs after this: ``wait`` for the end)."""
        if self._loop is None or self._server is None or self._stopping is not None:
            return
        self._stopping = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)

    def wait(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._stopping is None:
            self.stop(0)
        with contextlib.suppress(Exception):  # a stop past its grace: the loop is stopped below all the same
            self._stopping.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = self._server = self._stopping = None
        if self.address.startswith("unix:"):
            with contextlib.suppress(OSError):
                os.unlink(self.address[5:])
