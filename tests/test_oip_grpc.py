"""The Open Inference Protocol over gRPC on a real agent (real mosquitto, real ONNX model), driven by an unmodified
``tritonclient.grpc`` — its client and its own generated stubs and messages for what the client never sends — and by
raw bytes on a grpc channel for what no client sends."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import ModelFiles
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_oip import rows, start_agent
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException
from update_rig import MODEL, Rig, Subscriber, fails_beyond_batch_one, wait_for

from agent.daemon import Agent
from agent.errors import InvalidOptions
from agent.serve.host import ModelHost
from agent.serve.oip.grpc_server import OipGrpcServer
from agent.serve.serving import Serving
from agent.wire import device_topic
from agent.wire.inference import decode_reply
from fleet.dev.broker import RunningBroker


def start(rig: Rig, device: str, serving: str = "", extra: str = "", grpc_address: str = "127.0.0.1:0", version: str = "1.0.0") -> Agent:
    return start_agent(rig, device, f'grpc = "{grpc_address}"\n{serving}', extra, version=version)


@pytest.fixture(scope="module")
def agent(rig: Rig) -> Iterator[Agent]:
    a = start(rig, "grpc-1", extra="[telemetry]\nprediction_every = 1")
    yield a
    a.stop()


@pytest.fixture(scope="module")
def client(agent: Agent) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(agent.oip_grpc.url())
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(agent: Agent) -> Iterator[Any]:
    channel = grpc.insecure_channel(agent.oip_grpc.url())
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def infer(c: triton.InferenceServerClient, x: np.ndarray, **kw: Any) -> Any:
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return c.infer(MODEL, [inp], **kw)


def code(info: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(info.value.status())


def test_health_and_metadata(agent: Agent, client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1.0.0")
    assert not client.is_model_ready(MODEL, "9.9.9") and not client.is_model_ready("nope")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "edgefleet-agent"
    m = client.get_model_metadata(MODEL, as_json=True)
    assert m["versions"] == ["1.0.0"] and m["platform"] == agent.host.get(MODEL).runtime.name  # type: ignore[union-attr]
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert m["outputs"][0]["name"] == "y"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert code(info) == "StatusCode.NOT_FOUND"


def test_infer_one_row_a_batch_and_by_version(client: triton.InferenceServerClient, models: ModelFiles) -> None:
    for n in (1, 7):
        x = rows(n, seed=n)
        result = infer(client, x, request_id=f"g{n}")
        np.testing.assert_allclose(result.as_numpy("y"), models.mlp.reference(x), atol=1e-4)
        response = result.get_response()
        assert response.model_name == MODEL and response.model_version == "1.0.0" and response.id == f"g{n}"
    assert infer(client, rows(2), model_version="1.0.0", outputs=[triton.InferRequestedOutput("y")]).as_numpy("y").shape == (2, 10)


def test_concurrent_calls_get_their_own_answers(client: triton.InferenceServerClient, models: ModelFiles) -> None:
    xs = [rows(1 + i % 4, seed=200 + i) for i in range(40)]
    results: dict[int, Any] = {}

    def keep(i: int) -> Any:
        return lambda result, error: results.__setitem__(i, error or result)

    for i, x in enumerate(xs):
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.async_infer(MODEL, [inp], keep(i))
    wait_for(lambda: len(results) == len(xs), 30, "every answer")
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i].as_numpy("y"), models.mlp.reference(x), atol=1e-4)


def test_typed_contents_from_the_protocols_own_messages(stub: Any, models: ModelFiles) -> None:
    """tritonclient always sends raw bytes; other clients send ``contents``: FP32 values, INT32 converted as over MQTT."""
    x = rows(2, seed=9)
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 64])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(request)
    assert response.id == "typed" and response.outputs[0].name == "y" and list(response.outputs[0].shape) == [2, 10]
    y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_allclose(y, models.mlp.reference(x), atol=1e-4)
    ints = service_pb2.ModelInferRequest(model_name=MODEL)
    t = ints.inputs.add(name="x", datatype="INT32", shape=[1, 64])
    t.contents.int_contents.extend([1] * 64)
    assert list(stub.ModelInfer(ints).outputs[0].shape) == [1, 10]


def _typed_error(stub: Any, request: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    err: Any = info.value
    trailing = dict(err.trailing_metadata() or ())
    return err.code(), err.details(), trailing.get("edgefleet-error-code", "")


def _request(**tensor: Any) -> Any:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(**{"name": "x", "datatype": "FP32", "shape": [1, 64], **tensor})
    return request


def test_every_typed_error(agent: Agent, client: triton.InferenceServerClient, stub: Any) -> None:
    before = dict(agent.serving.stats.errors)
    x = rows(1)
    with pytest.raises(InferenceServerException) as info:
        client.infer("no-such-model", [triton.InferInput("x", [1, 64], "FP32").set_data_from_numpy(x)])
    assert code(info) == "StatusCode.NOT_FOUND" and "no model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        infer(client, x, model_version="2.0.0")
    assert code(info) == "StatusCode.NOT_FOUND" and "1.0.0" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        infer(client, x[:, :3].copy())
    assert code(info) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as info:
        infer(client, x, outputs=[triton.InferRequestedOutput("nope")])
    assert code(info) == "StatusCode.INVALID_ARGUMENT" and "no output" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        infer(client, np.full((1, 64), np.nan, np.float32))
    assert code(info) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as info:  # 2,000 rows: past serving.max_batch_rows (1,024)
        infer(client, rows(2000))
    assert code(info) == "StatusCode.INVALID_ARGUMENT" and "at most 1024" in info.value.message()
    with pytest.raises(InferenceServerException) as info:  # 5 MB: past serving.max_payload_kb, refused by grpc itself
        infer(client, rows(20_000))
    assert code(info) == "StatusCode.RESOURCE_EXHAUSTED"
    with pytest.raises(InferenceServerException) as info:
        infer(client, rows(1), timeout=1)  # Triton's queue timeout, in microseconds
    assert code(info) == "StatusCode.DEADLINE_EXCEEDED" and "deadline" in info.value.message()
    with pytest.raises(InferenceServerException) as info:  # a sequence: not something this endpoint keeps
        infer(client, rows(1), sequence_id=7, sequence_start=True)
    assert code(info) == "StatusCode.INVALID_ARGUMENT" and "unsupported" in info.value.message()
    assert _typed_error(stub, _request(datatype="BYTES"))[::2] == (grpc.StatusCode.INVALID_ARGUMENT, "bad_request")
    assert _typed_error(stub, _request(datatype="FP16"))[1].endswith("raw_input_contents only")
    short = _request()
    short.raw_input_contents.append(b"\0" * 100)
    assert "100 raw bytes" in _typed_error(stub, short)[1]
    wrong_field = _request()
    wrong_field.inputs[0].contents.int64_contents.extend([1] * 64)
    assert "fp32_contents" in _typed_error(stub, wrong_field)[1]
    out_of_range = _request(datatype="INT8", shape=[1, 1])
    out_of_range.inputs[0].contents.int_contents.append(300)
    assert "range" in _typed_error(stub, out_of_range)[1]
    huge_raw, huge_typed = _request(shape=[0, *[2**31 - 1] * 3]), _request(shape=[0, *[2**31 - 1] * 3])  # "array is too big"
    huge_raw.raw_input_contents.append(b"")  # zero bytes; huge_typed: zero fp32 values
    for huge in (huge_raw, huge_typed):
        assert _typed_error(stub, huge)[::2] == (grpc.StatusCode.INVALID_ARGUMENT, "bad_request")  # was: no answer for 300 s
    flagged = _request()
    flagged.raw_input_contents.append(rows(1).tobytes())
    flagged.outputs.add(name="y").parameters["binary_data"].string_param = "yes"
    assert "binary_data must be true or false" in _typed_error(stub, flagged)[1]
    errors = agent.serving.stats.errors
    grew = {k: errors.get(k, 0) - before.get(k, 0) for k in ("unknown_model", "shape_mismatch", "bad_request", "deadline_exceeded")}
    assert grew == {"unknown_model": 2, "shape_mismatch": 1, "bad_request": 12, "deadline_exceeded": 1}, grew
    twice = infer(client, rows(1), outputs=[triton.InferRequestedOutput("y"), triton.InferRequestedOutput("y")])
    assert [o.name for o in twice.get_response().outputs] == ["y", "y"]  # as REST answers it
    assert infer(client, rows(1)).as_numpy("y").shape == (1, 10)  # and it serves on


def _raw_call(agent: Agent, payload: bytes, method: str = "ModelInfer") -> grpc.StatusCode:
    with grpc.insecure_channel(agent.oip_grpc.url()) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        try:
            call(payload, timeout=10)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_bytes_that_are_no_request_are_refused_typed_and_serving_goes_on(agent: Agent, client: triton.InferenceServerClient) -> None:
    nested = b"".join([b"\x2a\x80\x80\x04"] * 200)  # field 5 (inputs) opened 200 deep, never closed
    for payload in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", nested, os.urandom(4096)):
        assert _raw_call(agent, payload) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    for method in ("ModelReady", "ModelMetadata"):  # parsed by the endpoint: a typed refusal, not grpc's INTERNAL
        assert _raw_call(agent, b"\x0a\x02\xff\xfe", method) == grpc.StatusCode.INVALID_ARGUMENT
    assert _raw_call(agent, b"", "ModelStreamInfer") == grpc.StatusCode.UNIMPLEMENTED
    assert _raw_call(agent, b"", "RepositoryIndex") == grpc.StatusCode.UNIMPLEMENTED
    assert infer(client, rows(1)).as_numpy("y").shape == (1, 10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(-3, 70), max_size=10),
    datatype=st.sampled_from(["FP32", "FP64", "INT8", "UINT64", "BOOL", "FP16", "BYTES", "", "fp32"]),
    raw=st.one_of(st.none(), st.binary(max_size=600)),
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=80),
)
def test_hypothesis_requests_get_an_answer_or_a_typed_refusal(
    agent: Agent, stub: Any, shape: list[int], datatype: str, raw: bytes | None, values: list[float]
) -> None:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    elif datatype in ("FP32", "FP64"):
        getattr(tensor.contents, "fp32_contents" if datatype == "FP32" else "fp64_contents").extend(values)
    try:
        response = stub.ModelInfer(request, timeout=10)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()  # type: ignore[attr-defined]
    else:
        assert list(response.outputs[0].shape)[-1] == 10
    assert agent.serving.healthy()


def test_answers_over_grpc_feed_prediction_sums_and_are_answered_inline(agent: Agent, client: triton.InferenceServerClient) -> None:
    infer(client, rows(1))
    agent.serving._call_s[MODEL] = 0.0  # measured fast (pinned: a loaded machine may time a call slow)
    agent.windows.predictions.take()
    agent.serving.stats.take()
    inline = agent.serving.inline_served
    for i in range(5):
        infer(client, rows(3, seed=i))
    assert agent.serving.inline_served == inline + 5  # a fast model: answered on grpc's thread, no hand-off
    sums = agent.windows.predictions.take()[(MODEL, "1.0.0")]
    assert sums["rows"] == 15 and sum(sums["classes"]) == 15
    windows, _ = agent.serving.stats.take()
    assert len(windows[(MODEL, "1.0.0")].latencies_ms) == 5


def test_a_model_that_fails_in_service_is_internal(rig: Rig) -> None:
    rig.release("3.2.0", fails_beyond_batch_one)
    agent = start(rig, "grpc-fail", version="3.2.0")
    c = triton.InferenceServerClient(agent.oip_grpc.url())
    try:
        assert infer(c, rows(1)).as_numpy("y").shape == (1, 10)
        with pytest.raises(InferenceServerException) as info:
            infer(c, rows(2))
        assert code(info) == "StatusCode.INTERNAL" and agent.serving.stats.errors["internal"] == 1
        assert infer(c, rows(1)).as_numpy("y").shape == (1, 10)
    finally:
        c.close()
        agent.stop()


def test_overload_is_unavailable_and_a_client_past_its_rate_resource_exhausted(rig: Rig) -> None:
    agent = start(rig, "grpc-flood", "queue_size = 1\nworkers = 1\ninline_below_ms = 0")
    c = triton.InferenceServerClient(agent.oip_grpc.url())
    try:
        x = rows(256)
        outcomes: list[str] = []
        for _ in range(200):
            inp = triton.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            c.async_infer(MODEL, [inp], lambda result, error: outcomes.append("OK" if error is None else str(error.status())))
        wait_for(lambda: len(outcomes) == 200, 60, "every answer")
        assert set(outcomes) == {"OK", "StatusCode.UNAVAILABLE"}, set(outcomes)
        assert agent.serving.stats.errors["overloaded"] == outcomes.count("StatusCode.UNAVAILABLE")
    finally:
        c.close()
        agent.stop()
    agent = start(rig, "grpc-rate", "client_rps = 20\nclient_burst = 5")
    c = triton.InferenceServerClient(agent.oip_grpc.url())
    try:
        codes = []
        for _ in range(30):
            try:
                infer(c, rows(1))
                codes.append("OK")
            except InferenceServerException as exc:
                codes.append(str(exc.status()))
        assert codes.count("StatusCode.RESOURCE_EXHAUSTED") > 0 and codes.count("OK") >= 5, codes
        assert set(codes) == {"OK", "StatusCode.RESOURCE_EXHAUSTED"}
        assert agent.serving.rate_limited == codes.count("StatusCode.RESOURCE_EXHAUSTED")
    finally:
        c.close()
        agent.stop()


def test_predictions_for_grpc_clients_reach_mqtt_subscribers(rig: Rig, mqtt_broker: RunningBroker, models: ModelFiles) -> None:
    agent = start(rig, "grpc-pub", extra="[serving.publish_predictions]\nevery = 1")
    sub = Subscriber(mqtt_broker, [device_topic("grpc-pub", "pred", "#")], "grpc-pred-watcher")
    c = triton.InferenceServerClient(agent.oip_grpc.url())
    try:
        x = rows(2, seed=5)
        infer(c, x, request_id="p0")
        wait_for(lambda: len(sub.payloads()) >= 1, 10, "a published prediction")
        reply = decode_reply(sub.payloads(device_topic("grpc-pub", "pred", MODEL))[0])
        assert reply.request_id == "p0" and reply.version == "1.0.0"
        np.testing.assert_allclose(reply.outputs["y"], models.mlp.reference(x), atol=1e-4)
    finally:
        c.close()
        sub.close()
        agent.stop()


def test_a_unix_socket_endpoint_beside_http(rig: Rig, tmp_path: Path, models: ModelFiles) -> None:
    path = tmp_path / "run" / "grpc.sock"
    path.parent.mkdir()
    path.write_bytes(b"precious")  # not a socket: refused, never deleted
    serving = Serving("grpc-unix-bad", ModelHost(), lambda *a: None)
    with pytest.raises(InvalidOptions, match="is not a socket"):
        OipGrpcServer(f"unix:{path}", serving, serving.host).start()
    with pytest.raises(InvalidOptions, match="cannot listen"):
        OipGrpcServer("192.0.2.1:0", serving, serving.host).start()  # an address this machine does not have
    assert path.read_bytes() == b"precious"
    path.unlink()
    agent = start(rig, "grpc-unix", grpc_address=f"unix:{path}")
    try:
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o660
        c = triton.InferenceServerClient(f"unix:{path}")
        x = rows(3)
        np.testing.assert_allclose(infer(c, x).as_numpy("y"), models.mlp.reference(x), atol=1e-4)
        c.close()
        assert agent.oip is not None  # REST stays on beside it
    finally:
        agent.stop()
    assert not path.exists()
