"""A small client for applications: send inference requests to a device over MQTT and get numpy arrays back.

    with EdgeClient("broker.local", 1883) as c:
        y = c.infer("cam-17", "mlp", {"x": batch})["y"]

Requests go to ``edgefleet/v1/dev/{device}/infer/{model}/{client id}`` (the broker's ACL lets an application publish
only under its own name, and the device limits each client's rate by it); replies come back on this client's own topic
under the device's ``pred/{model}/`` tree, matched by ``request_id``. ``submit`` returns a future, so many
requests can be in flight at once.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from agent.errors import EdgefleetError
from agent.mqtt import make_client
from agent.settings import BrokerSettings
from agent.wire import ROOT, device_topic
from agent.wire.inference import Reply, decode_reply, encode_request

__all__ = ["EdgeClient", "Prediction", "RemoteError"]


class RemoteError(EdgefleetError):
    """The device answered with an error; ``code`` is its error code (bad_request, overloaded, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Prediction(dict[str, np.ndarray]):
    """The outputs by name, plus which model version answered and its latency on the device."""

    model: str = ""
    version: str = ""
    latency_ms: float = 0.0


class EdgeClient:
    def __init__(
        self, host: str = "127.0.0.1", port: int = 1883, client_id: str | None = None, broker: BrokerSettings | None = None
    ) -> None:
        self.client_id = client_id or f"app-{uuid.uuid4().hex[:10]}"
        settings = broker or BrokerSettings(host=host, port=port)
        self._pending: dict[str, Future[Reply]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._client = make_client(settings, self.client_id)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.connect(settings.host, settings.port, keepalive=30)
        self._client.loop_start()
        if not self._ready.wait(10):
            self.close()
            raise ConnectionError(f"no MQTT connection to {settings.host}:{settings.port}")

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(f"{ROOT}/dev/+/pred/+/{self.client_id}", qos=1)
        self._ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            reply = decode_reply(bytes(msg.payload))
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            fut = self._pending.pop(reply.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    def submit(
        self,
        device: str,
        model: str,
        inputs: dict[str, np.ndarray] | np.ndarray,
        binary: bool = False,
        b64: bool = False,
        deadline_ms: float | None = None,
        qos: int = 1,
    ) -> Future[Reply]:
        rid = uuid.uuid4().hex
        fut: Future[Reply] = Future()
        with self._lock:
            self._pending[rid] = fut
        payload = encode_request(rid, inputs, binary, b64, device_topic(device, "pred", model, self.client_id), deadline_ms)
        self._client.publish(device_topic(device, "infer", model, self.client_id), payload, qos=qos)
        return fut

    def infer(
        self,
        device: str,
        model: str,
        inputs: dict[str, np.ndarray] | np.ndarray,
        timeout: float = 10.0,
        binary: bool = False,
        b64: bool = False,
        deadline_ms: float | None = None,
    ) -> Prediction:
        """One request; the outputs by name. A device error raises ``RemoteError`` with its code."""
        fut = self.submit(device, model, inputs, binary, b64, deadline_ms)
        try:
            reply = fut.result(timeout)
        except TimeoutError:
            raise RemoteError("timeout", f"no answer from {device} within {timeout:g} s") from None
        return self.result(reply)

    @staticmethod
    def result(reply: Reply) -> Prediction:
        if reply.error_code:
            raise RemoteError(reply.error_code, reply.error_message)
        out = Prediction(reply.outputs)
        out.model, out.version, out.latency_ms = reply.model, reply.version, reply.latency_ms
        return out
