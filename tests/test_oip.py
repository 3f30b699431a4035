"""The Open Inference Protocol endpoint of a real agent (real mosquitto, real ONNX model), driven by an unmodified
``tritonclient.http`` and by raw sockets for what a well-behaved client never sends."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from conftest import ModelFiles
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException
from update_rig import MODEL, VARIANT, Rig, Subscriber, fails_beyond_batch_one, wait_for

from agent.daemon import Agent
from agent.serve.oip.codec import decode_infer
from agent.settings import load_settings
from agent.wire import device_topic
from agent.wire.inference import PayloadError, decode_reply
from fleet.dev.broker import RunningBroker
from fleet.transport.announce import announce


def start_agent(rig: Rig, device: str, serving: str = "", extra: str = "", http: str = "127.0.0.1:0", version: str = "1.0.0") -> Agent:
    """An agent serving the MLP over MQTT and on ``http``; ``serving`` adds [serving] keys, ``extra`` more tables."""
    config = rig.write_config(device)
    # no early telemetry batch after the install: these tests read the serving counters that a batch would take
    quiet = "first_report_s = 0"
    extra = extra.replace("[telemetry]", f"[telemetry]\n{quiet}") if "[telemetry]" in extra else f"{extra}\n[telemetry]\n{quiet}"
    config.write_text(config.read_text() + f'[serving]\nhttp = "{http}"\n{serving}\n{extra}\n')
    agent = Agent(load_settings(config)).start()
    assert agent.wait_connected()
    rig.assign(device, version)
    wait_for(lambda: agent.host.get(MODEL) is not None, what="the model installed")
    return agent


def url(agent: Agent) -> str:
    return f"127.0.0.1:{agent.oip.port}"


@pytest.fixture(scope="module")
def agent(rig: Rig) -> Iterator[Agent]:
    a = start_agent(rig, "oip-1", extra="[telemetry]\nprediction_every = 1")
    yield a
    a.stop()


@pytest.fixture(scope="module")
def client(agent: Agent) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url(agent), concurrency=4)
    yield c
    c.close()


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 64)).astype(np.float32)


def infer(c: triton.InferenceServerClient, x: np.ndarray, binary_in: bool = True, binary_out: bool = True, **kw: Any) -> Any:
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    return c.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("y", binary_data=binary_out)], **kw)


def test_health_and_metadata(agent: Agent, client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1.0.0")
    assert not client.is_model_ready(MODEL, "9.9.9") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "edgefleet-agent" and "binary_tensor_data" in meta["extensions"]
    m = client.get_model_metadata(MODEL)
    assert m["versions"] == ["1.0.0"] and m["platform"] == agent.host.get(MODEL).runtime.name  # type: ignore[union-attr]
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    assert m["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata(MODEL, "1.0.0") == m


@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False), (True, False), (False, True)])
def test_infer_binary_on_and_off_and_a_batch(
    agent: Agent, client: triton.InferenceServerClient, models: ModelFiles, binary_in: bool, binary_out: bool
) -> None:
    for n in (1, 7):  # one row, and a batch of seven in one request
        x = rows(n, seed=n)
        result = infer(client, x, binary_in, binary_out, request_id=f"r{n}")
        np.testing.assert_allclose(result.as_numpy("y"), models.mlp.reference(x), atol=1e-4)
        response = result.get_response()
        assert response["model_name"] == MODEL and response["model_version"] == "1.0.0" and response["id"] == f"r{n}"
    assert infer(client, rows(2), model_version="1.0.0").as_numpy("y").shape == (2, 10)


def test_concurrent_requests_all_get_their_own_answer(agent: Agent, client: triton.InferenceServerClient, models: ModelFiles) -> None:
    xs = [rows(1 + i % 4, seed=100 + i) for i in range(40)]
    pending = []
    for x in xs:
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        pending.append(client.async_infer(MODEL, [inp]))
    for x, p in zip(xs, pending):
        np.testing.assert_allclose(p.get_result().as_numpy("y"), models.mlp.reference(x), atol=1e-4)


def test_answers_over_http_feed_prediction_sums_like_mqtt(agent: Agent, client: triton.InferenceServerClient) -> None:
    """The host's on_served hook (prediction sums, the shadow's feed) sees HTTP answers; the latency window too."""
    agent.windows.predictions.take()
    agent.serving.stats.take()
    infer(client, rows(1))
    agent.serving._call_s[MODEL] = 0.0  # measured fast (pinned: a loaded machine may time a call slow)
    # the answer may reach the client just before its latency is counted: drain until the warm-up call's is in
    wait_for(lambda: (MODEL, "1.0.0") in agent.serving.stats.take()[0], 10, "the warm-up call counted")
    agent.windows.predictions.take()
    inline = agent.serving.inline_served
    for i in range(5):
        infer(client, rows(3, seed=i))
    assert agent.serving.inline_served == inline + 5  # a fast model: answered on the event loop, no thread hand-off
    sums = agent.windows.predictions.take()[(MODEL, "1.0.0")]
    assert sums["rows"] == 15 and sum(sums["classes"]) == 15
    latencies: list[float] = []

    def five_counted() -> bool:
        windows, _ = agent.serving.stats.take()
        window = windows.get((MODEL, "1.0.0"))
        latencies.extend(window.latencies_ms if window else [])
        return len(latencies) >= 5

    wait_for(five_counted, 10, "five latencies")
    assert len(latencies) == 5


def _status(exc: pytest.ExceptionInfo[InferenceServerException]) -> int:
    return int(exc.value.status())


def test_every_typed_error_through_tritonclient(agent: Agent, client: triton.InferenceServerClient) -> None:
    before = dict(agent.serving.stats.errors)
    x = rows(1)
    with pytest.raises(InferenceServerException) as info:
        client.infer("no-such-model", [triton.InferInput("x", [1, 64], "FP32").set_data_from_numpy(x)])
    assert _status(info) == 404 and "no model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        infer(client, x, model_version="2.0.0")
    assert _status(info) == 404 and "1.0.0" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        infer(client, x[:, :3].copy())  # shape mismatch
    assert _status(info) == 400
    inp = triton.InferInput("x", [1, 64], "INT32")  # integers for a float input are converted, as over MQTT
    inp.set_data_from_numpy(np.ones((1, 64), np.int32))
    assert client.infer(MODEL, [inp]).as_numpy("y").shape == (1, 10)
    with pytest.raises(InferenceServerException) as info:  # a dtype the endpoint does not take
        inp = triton.InferInput("x", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"a"], dtype=np.object_))
        client.infer(MODEL, [inp])
    assert _status(info) == 400 and "datatype" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        inp = triton.InferInput("x", [1, 64], "FP32").set_data_from_numpy(x)
        client.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("nope")])
    assert _status(info) == 400 and "no output" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        infer(client, np.full((1, 64), np.nan, np.float32))
    assert _status(info) == 400
    with pytest.raises(InferenceServerException) as info:  # 2,000 rows: past serving.max_batch_rows (1,024)
        infer(client, rows(2000))
    assert _status(info) == 400 and "at most 1024" in info.value.message()
    with pytest.raises(InferenceServerException) as info:  # 5 MB: past serving.max_payload_kb, refused before reading
        infer(client, rows(20_000))
    assert _status(info) == 413
    with pytest.raises(InferenceServerException) as info:
        infer(client, rows(1), timeout=1)  # Triton's queue timeout, in microseconds
    assert _status(info) == 503 and "deadline" in info.value.message()
    errors = agent.serving.stats.errors
    grew = {k: errors.get(k, 0) - before.get(k, 0) for k in ("unknown_model", "shape_mismatch", "bad_request", "deadline_exceeded")}
    assert grew == {"unknown_model": 2, "shape_mismatch": 1, "bad_request": 5, "deadline_exceeded": 1}, grew
    assert infer(client, rows(1)).as_numpy("y").shape == (1, 10)  # and it serves on


# -- what no well-behaved client sends: raw HTTP -------------------------------------------------


def raw(
    agent: Agent, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", agent.oip.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def body_of(x: np.ndarray, **extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}).encode()


BAD_BODIES = [
    (b"{", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    (b'{"inputs": []}', "inputs"),
    (b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": "text"}]}', "data"),
    (b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [1, 2]}]}', "2 values"),
    (b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [[1], [1, 2]]}]}', "ragged"),
    (b'{"inputs": [{"name": "x", "shape": [1, -3], "datatype": "FP32", "data": [1]}]}', "shape"),
    (b'{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "INT8", "data": [300]}]}', "range"),
    (b'{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "INT8", "data": [0.5]}]}', "INT8"),
    (b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0]}], "surprise": 1}', "unknown fields"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}], "parameters": {"sequence_id": 3}}', "unsupported"),
    (b'{"id": 5, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}]}', "id"),
]


@pytest.mark.parametrize(("body", "words"), BAD_BODIES, ids=[w for _, w in BAD_BODIES])
def test_malformed_bodies_get_400_with_an_oip_error_body(agent: Agent, body: bytes, words: str) -> None:
    status, headers, data = raw(agent, "POST", f"/v2/models/{MODEL}/infer", body, {"Content-Type": "application/json"})
    assert status == 400, data[:300]
    assert words.lower() in json.loads(data)["error"].lower() and headers["edgefleet-error-code"] == "bad_request"


def binary_request(x: np.ndarray, claim: int | None = None) -> tuple[bytes, int]:
    raw_x = x.tobytes()
    head = json.dumps(
        {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": claim or len(raw_x)}}]}
    ).encode()
    return head + raw_x, len(head)


def test_binary_lengths_that_lie_are_refused(agent: Agent, models: ModelFiles) -> None:
    x = rows(2)
    body, head = binary_request(x)
    path = f"/v2/models/{MODEL}/infer"
    status, headers, data = raw(agent, "POST", path, body, {"Inference-Header-Content-Length": str(head)})
    assert status == 200 and headers["content-type"] == "application/json"  # binary in, JSON out (none asked binary)
    y = np.asarray(json.loads(data)["outputs"][0]["data"], np.float32).reshape(2, 10)
    np.testing.assert_allclose(y, models.mlp.reference(x), atol=1e-4)
    cases = [
        (body, str(len(body) + 10), "does not fit"),  # header length past the body
        (body, str(head - 5), "json"),  # header cut short: malformed JSON
        (body, "12abc", "number"),
        (body + b"\0" * 8, str(head), "after the last tensor"),  # bytes nobody claimed
        (body[:-8], str(head), "left in the body"),  # truncated tensor bytes
        (binary_request(x, claim=12)[0], str(binary_request(x, claim=12)[1]), "binary_data_size"),
    ]
    huge = [0, 2**31 - 1, 2**31 - 1, 2**31 - 1]  # zero bytes, but numpy refuses the shape ("array is too big")
    head_huge = json.dumps({"inputs": [{"name": "x", "shape": huge, "datatype": "FP32", "parameters": {"binary_data_size": 0}}]})
    cases.append((head_huge.encode(), str(len(head_huge)), "too big"))  # was never answered: the request hung
    for payload, claim, words in cases:
        status, _, data = raw(agent, "POST", path, payload, {"Inference-Header-Content-Length": claim})
        assert status == 400 and words in json.loads(data)["error"].lower(), (claim, data)


def test_routes_methods_encodings_and_truncated_bodies(agent: Agent) -> None:
    assert raw(agent, "GET", "/v2/nothing/here")[0] == 404
    assert raw(agent, "GET", "/metrics")[0] == 404
    assert raw(agent, "DELETE", f"/v2/models/{MODEL}")[0] == 405
    status, _, data = raw(agent, "POST", f"/v2/models/{MODEL}/infer", b"\x1f\x8b...", {"Content-Encoding": "gzip"})
    assert status == 415 and "compressed" in json.loads(data)["error"]
    # a body shorter than its Content-Length, then the connection closed: nothing to answer, nothing broken
    with socket.create_connection(("127.0.0.1", agent.oip.port), timeout=10) as s:
        s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())
    # a request line that is not HTTP
    with socket.create_connection(("127.0.0.1", agent.oip.port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400") or True  # uvicorn answers 400 or closes; either way it serves on
    assert raw(agent, "POST", f"/v2/models/{MODEL}/infer", body_of(rows(1)))[0] == 200


def test_a_slow_client_gets_408_and_does_not_hold_up_others(rig: Rig, models: ModelFiles) -> None:
    agent = start_agent(rig, "oip-slow", "http_body_timeout_s = 1.0\nhttp_max_connections = 8")
    try:
        body = body_of(rows(1))
        slow = socket.create_connection(("127.0.0.1", agent.oip.port), timeout=10)
        slow.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        t0 = time.monotonic()
        status, _, _ = raw(agent, "POST", f"/v2/models/{MODEL}/infer", body)  # answered while the slow one waits
        assert status == 200 and time.monotonic() - t0 < 0.9
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = slow.recv(4096)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert 0.9 < time.monotonic() - t0 < 5
        slow.close()
        assert agent.serving.stats.errors["bad_request"] >= 1
    finally:
        agent.stop()


def test_a_shadow_runs_on_the_inputs_of_http_requests(rig: Rig) -> None:
    """The shadow (a second version answering nobody) sees HTTP-served inputs, as it sees MQTT-served ones."""
    rig.release("1.0.1")  # built from the same source: it agrees on every row
    agent = start_agent(rig, "oip-shadow", extra="[telemetry]\ninterval_s = 60")
    c = triton.InferenceServerClient(url(agent))
    try:
        rig.director.assign("oip-shadow", rig.image, MODEL, "1.0.0", VARIANT, rig.keys, shadow=("1.0.1", VARIANT))
        announce(rig.director, ["oip-shadow"], rig.broker.host, rig.broker.port)
        wait_for(lambda: agent.host.shadow(MODEL) is not None, what="the shadow loaded")
        agent.shadow.take()
        for i in range(6):
            infer(c, rows(2, seed=i))
        compared: dict[str, int] = {"compared": 0, "agreed": 0, "skipped": 0}

        def six_seen() -> bool:
            window = agent.shadow.take().get(MODEL, {})
            for k in compared:
                compared[k] += window.get(k) or 0
            return compared["compared"] // 2 + compared["skipped"] >= 6

        wait_for(six_seen, 20, "the shadow's comparisons")
        assert compared["agreed"] == compared["compared"] > 0, compared
    finally:
        c.close()
        agent.stop()


def test_a_model_that_fails_in_service_is_500_internal(rig: Rig) -> None:
    rig.release("3.1.0", fails_beyond_batch_one)  # passes its one-row health check, fails on two rows
    agent = start_agent(rig, "oip-fail", version="3.1.0")
    c = triton.InferenceServerClient(url(agent))
    try:
        assert infer(c, rows(1)).as_numpy("y").shape == (1, 10)
        with pytest.raises(InferenceServerException) as info:
            infer(c, rows(2))
        assert _status(info) == 500 and agent.serving.stats.errors["internal"] == 1
        assert infer(c, rows(1)).as_numpy("y").shape == (1, 10)  # and it serves on
    finally:
        c.close()
        agent.stop()


def test_overload_is_503_and_a_client_past_its_rate_429(rig: Rig) -> None:
    agent = start_agent(rig, "oip-flood", "queue_size = 1\nworkers = 1\ninline_below_ms = 0")
    c = triton.InferenceServerClient(url(agent), concurrency=32)
    try:
        x = rows(256)
        pending = []
        for _ in range(200):
            inp = triton.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            pending.append(c.async_infer(MODEL, [inp]))
        statuses = []
        for p in pending:
            try:
                p.get_result()
                statuses.append(200)
            except InferenceServerException as exc:
                statuses.append(int(exc.status()))
        assert set(statuses) == {200, 503} and len(statuses) == 200, set(statuses)
        assert agent.serving.stats.errors["overloaded"] == statuses.count(503)
    finally:
        c.close()
        agent.stop()
    agent = start_agent(rig, "oip-rate", "client_rps = 20\nclient_burst = 5")
    c = triton.InferenceServerClient(url(agent))
    try:
        statuses = []
        for _ in range(30):
            try:
                infer(c, rows(1))
                statuses.append(200)
            except InferenceServerException as exc:
                statuses.append(int(exc.status()))
        assert statuses.count(429) > 0 and statuses.count(200) >= 5 and set(statuses) == {200, 429}
        status, headers, _ = raw(agent, "POST", f"/v2/models/{MODEL}/infer", body_of(rows(1)))
        assert status == 200 or headers["retry-after"] == "1"
        assert agent.serving.rate_limited == statuses.count(429) + (status == 429)
    finally:
        c.close()
        agent.stop()


def test_predictions_for_http_clients_reach_mqtt_subscribers(rig: Rig, mqtt_broker: RunningBroker, models: ModelFiles) -> None:
    rule = "[serving.publish_predictions]\nevery = 2\ntop_classes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"
    agent = start_agent(rig, "oip-pub", extra=rule)
    sub = Subscriber(mqtt_broker, [device_topic("oip-pub", "pred", "#")], "pred-watcher")
    c = triton.InferenceServerClient(url(agent))
    try:
        xs = [rows(2, seed=i) for i in range(6)]
        for i, x in enumerate(xs):
            infer(c, x, request_id=f"p{i}")
        wait_for(lambda: len(sub.payloads()) >= 3, 10, "three published predictions")
        replies = [decode_reply(p) for p in sub.payloads(device_topic("oip-pub", "pred", MODEL))]
        ids = [r.request_id for r in replies]
        # every 2nd answer in the order the answers were counted: a fast call answered inline on the event loop can be
        # counted before the previous one a worker answered, so which three is not fixed — three distinct ones are
        assert len(ids) == 3 and len(set(ids)) == 3 and set(ids) <= {f"p{i}" for i in range(6)}, ids
        for r in replies:
            assert r.model == MODEL and r.version == "1.0.0"
            np.testing.assert_allclose(r.outputs["y"], models.mlp.reference(xs[int(r.request_id[1:])]), atol=1e-4)
        mirror = agent.serving.mirror
        assert mirror is not None and mirror.published == 3  # every = 2 of 6 answers, no more
        mirror.rule = mirror.rule.model_copy(update={"every": 1, "value_above": 1e9})  # a rule no answer meets
        infer(c, rows(1))
        assert mirror.published == 3
    finally:
        c.close()
        sub.close()
        agent.stop()


def test_a_unix_socket_endpoint(rig: Rig, tmp_path: Path, models: ModelFiles) -> None:
    path = tmp_path / "run" / "oip.sock"
    agent = start_agent(rig, "oip-unix", http=f"unix:{path}")
    try:
        assert path.is_socket() and oct(path.stat().st_mode & 0o777) == "0o660"

        class UnixConnection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))

        conn = UnixConnection("localhost", timeout=10)
        conn.request("GET", "/v2/health/ready")
        ready = conn.getresponse()
        assert ready.status == 200 and ready.read() == b""
        x = rows(3)
        conn.request("POST", f"/v2/models/{MODEL}/infer", body=body_of(x, outputs=[{"name": "y"}]))
        resp = conn.getresponse()
        out = json.loads(resp.read())["outputs"][0]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), models.mlp.reference(x), atol=1e-4)
        conn.close()
    finally:
        agent.stop()
    assert not path.exists()


def test_not_ready_before_a_model_and_a_busy_port_is_a_clear_error(rig: Rig) -> None:
    config = rig.write_config("oip-empty")
    config.write_text(config.read_text() + '[serving]\nhttp = "127.0.0.1:0"\n')
    agent = Agent(load_settings(config)).start()
    try:
        assert raw(agent, "GET", "/v2/health/live")[0] == 200
        assert raw(agent, "GET", "/v2/health/ready")[0] == 503  # nothing assigned yet: no model to serve
        busy = f"127.0.0.1:{agent.oip.port}"
        config.write_text(config.read_text().replace('"127.0.0.1:0"', f'"{busy}"'))
        from agent.errors import InvalidOptions

        other = Agent(load_settings(config).model_copy(update={"device_id": "oip-empty2"}))
        with pytest.raises(InvalidOptions, match="cannot listen"):
            other.oip.start()
        other.store.close()
    finally:
        agent.stop()


# -- the decoder alone ---------------------------------------------------------------------------

tensor = st.fixed_dictionaries(
    {
        "name": st.one_of(st.text(max_size=4), st.integers()),
        "shape": st.lists(st.integers(-2, 5), max_size=4),
        "datatype": st.sampled_from(["FP32", "INT8", "BOOL", "BYTES", "FP16", "UINT8", 3]),
    },
    optional={
        "data": st.recursive(st.floats() | st.integers(-(2**70), 2**70) | st.booleans() | st.text(max_size=2), st.lists, max_leaves=8),
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 40)}),
    },
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=100),
        st.builds(lambda ins: json.dumps({"inputs": ins}).encode(), st.lists(tensor, max_size=3)),
    ),
    st.one_of(st.none(), st.integers(-5, 200)),
    st.binary(max_size=40),
)
def test_the_oip_decoder_raises_only_its_own_typed_error(body: bytes, header_length: int | None, tail: bytes) -> None:
    try:
        req = decode_infer(body + tail if header_length is not None else body, header_length, 4096)
    except PayloadError:
        return
    assert isinstance(req.inputs, dict) and req.inputs and all(isinstance(a, np.ndarray) for a in req.inputs.values())


def test_a_client_that_disconnects_while_waiting_costs_nothing(agent: Agent) -> None:
    """A request answered after its client left: the answer is dropped, the worker and the loop serve on."""
    body = body_of(rows(1))
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", agent.oip.port), timeout=10)
        s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        s.close()
    done = threading.Event()

    def ok() -> None:
        done.set() if raw(agent, "POST", f"/v2/models/{MODEL}/infer", body)[0] == 200 else None

    ok()
    assert done.is_set() and agent.serving.healthy() and agent.oip.healthy()


def test_a_chunked_body_past_the_limit_is_cut_off_with_413(agent: Agent) -> None:
    """No Content-Length to refuse up front: the endpoint stops reading at serving.max_payload_kb."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.oip.port, timeout=30)
    try:
        chunks = (b"[" + b"0.0," * 16_383 + b"0.0]," for _ in range(80))  # 80 x 64 KiB: past the 4 MiB limit
        conn.request("POST", f"/v2/models/{MODEL}/infer", body=chunks, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and "limit" in json.loads(resp.read())["error"]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the endpoint answered and closed while the client was still sending: refused all the same
    finally:
        conn.close()
    assert raw(agent, "POST", f"/v2/models/{MODEL}/infer", body_of(rows(1)))[0] == 200


def test_settings_for_the_endpoint_and_publishing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.errors import InvalidOptions
    from agent.settings import PublishPredictions

    config = tmp_path / "agent.toml"
    config.write_text('device_id = "d"\n[serving]\nhttp = "127.0.0.1:8000"\n[serving.publish_predictions]\nevery = 10\ntop_classes = [3]\n')
    s = load_settings(config)
    assert s.serving.http == "127.0.0.1:8000" and s.serving.publish_predictions == PublishPredictions(every=10, top_classes=[3])
    assert load_settings(config, serving={"http": "unix:/run/edgefleet/oip.sock"}).serving.http == "unix:/run/edgefleet/oip.sock"
    monkeypatch.setenv("EDGEFLEET_SERVING__PUBLISH_PREDICTIONS__EVERY", "1")
    assert load_settings(config).serving.publish_predictions.every == 1
    for bad in ("localhost", "127.0.0.1:99999", "unix:", "http://127.0.0.1:8000"):
        with pytest.raises(InvalidOptions, match=r"serving\.http"):
            load_settings(config, serving={"http": bad})
    with pytest.raises(InvalidOptions, match=r"publish_predictions\.every"):
        load_settings(config, serving={"publish_predictions": {"every": -1}})
    assert load_settings(tmp_path / "none.toml", device_id="d").serving.http is None  # off unless asked for


DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64}
DATATYPES |= {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


@pytest.fixture(params=["orjson", "stdlib json"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The OIP codec with orjson and without it (``agent.wire.fastjson`` loaded where ``import orjson`` fails)."""
    import importlib

    import agent.serve.oip.codec as module
    import agent.wire.fastjson as fastjson

    if request.param == "stdlib json":
        monkeypatch.setitem(sys.modules, "orjson", None)  # import orjson raises ImportError
    assert importlib.reload(fastjson).FAST == (request.param == "orjson")
    yield module
    monkeypatch.undo()
    importlib.reload(fastjson)


@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype_round_trips_through_tritonclients_own_encoder_and_parser(codec: Any, binary: bool) -> None:
    """tritonclient builds the request body and parses the response body (its own code, unmodified); ours in between."""
    OipRequest, encode_infer, decode = codec.OipRequest, codec.encode_infer, codec.decode_infer

    rng = np.random.default_rng(0)
    arrays = {
        name: (rng.uniform(-100, 100, (2, 3)) > 0 if dt is np.bool_ else rng.uniform(0, 100, (2, 3))).astype(dt)
        for name, dt in DATATYPES.items()
    }
    inputs = []
    for name, arr in arrays.items():
        inp = triton.InferInput(f"in_{name}", list(arr.shape), name)
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    outputs = [triton.InferRequestedOutput(f"in_{name}", binary_data=binary) for name in arrays]
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs, request_id="rt-1")
    req = decode(body, json_size, 1 << 20)
    assert isinstance(req, OipRequest) and req.oip_id == "rt-1" and isinstance(req.inputs, dict)
    for name, arr in arrays.items():
        got = req.inputs[f"in_{name}"]
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name
    answer, header = encode_infer(req, "m", "1", req.inputs)  # echo the inputs back as outputs
    result = triton.InferResult.from_response_body(answer, header_length=header)
    assert result.get_response()["id"] == "rt-1" and (header is not None) == binary
    for name, arr in arrays.items():
        out = result.as_numpy(f"in_{name}")
        assert out.dtype == arr.dtype and np.array_equal(out, arr), name


@pytest.mark.parametrize("where", ["header", "url"])
def test_an_endless_request_head_is_cut_off_with_431_not_buffered(agent: Agent, where: str) -> None:
    """httptools buffers a URL or a header whole: one endless header line grew the agent by 200 MB in a second."""
    import psutil

    rss = psutil.Process().memory_info().rss
    before = agent.serving.stats.errors.get("bad_request", 0)
    head = b"GET /v2?" if where == "url" else b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: "
    with socket.create_connection(("127.0.0.1", agent.oip.port), timeout=10) as s:
        s.sendall(head)
        sent = 0
        try:
            while sent < 50 << 20:  # 50 MB, if the endpoint kept reading
                s.sendall(b"a" * (1 << 20))
                sent += 1 << 20
        except OSError:
            pass  # closed by the endpoint, as it should
        reply = s.recv(200)
    assert reply.startswith(b"HTTP/1.1 431") or reply == b"", reply  # a reset may beat the answer to the client
    assert sent < 8 << 20 and psutil.Process().memory_info().rss - rss < 20 << 20
    assert wait_for(lambda: agent.serving.stats.errors.get("bad_request", 0) > before, 10, "the refusal counted")
    assert raw(agent, "GET", "/v2/health/ready")[0] == 200  # and it serves on


def test_non_finite_outputs_read_back_through_tritonclient_with_or_without_orjson(codec: Any) -> None:
    """A NaN or an infinity in an output is written as the stdlib writes it (``NaN``, ``Infinity``), whichever JSON
    library is installed, and tritonclient's own parser reads the same values back (orjson alone wrote ``null``, which
    ``as_numpy`` cannot take: a TypeError in the client)."""
    y = np.array([[np.nan, np.inf, -np.inf, 1.5]], np.float32)
    inp = triton.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), np.float32), binary_data=False)
    body, json_size = triton.InferenceServerClient.generate_request_body([inp], [triton.InferRequestedOutput("y", binary_data=False)])
    answer, header = codec.encode_infer(codec.decode_infer(body, json_size, 1 << 20), "m", "1", {"y": y})
    assert header is None and b"NaN" in answer and b"null" not in answer
    out = triton.InferResult.from_response_body(answer, header_length=header).as_numpy("y")
    assert out.dtype == np.float32 and np.array_equal(out, y, equal_nan=True)
