"""The OIP rows of benchmarks/serving.py: the agent's endpoints against bare echoes on the same stacks.

Baseline: a raw ASGI echo on uvicorn + httptools (``benchmarks.http_stacks``), the stack the agent's endpoint is
built on: HTTP parsing and answering, nothing else. Contender: ``edge-agent run`` in its own process with
``serving.http``, serving the model. The same client (``benchmarks.http_client``: geventhttpclient, tritonclient's
transport) posts the same OIP infer body to both, JSON tensors or binary ones, in alternating rounds: requests/s
with a window in flight, p50 one at a time. Per round pair: the ratio of requests/s and the p50 difference; the
row reports their median, the ratio's spread (± half the interquartile range) and its lowest and highest pair, as
every table of ``benchmarks.common``. Goals (issue 17): >= 0.8x the echo's requests/s, p50 within 0.5 ms. How many
pairs: ``REST_FULL`` / ``REST_QUICK`` (at least ``min_pairs``, more while the budget lasts; ``--repeat`` multiplies
both) of short rounds, because a REST row's pairs spread from 0.6 to 1.2 on this machine and eight long ones moved
the median by ±0.1 between runs; the gRPC rows, with no goal, run half of its ``min_pairs``.

gRPC rows (no goal: a measurement): the agent's ``serving.grpc`` endpoint against a bare grpc.aio server (the
endpoint's stack) whose ModelInfer returns the request's bytes, both called with the same ModelInferRequest bytes on one grpcio channel
(``GrpcLoad``: bytes both ways, nothing parsed on the client), raw tensors and typed ``fp32_contents``.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Paired, Plan, paired_rounds, spread_cell, yes_no
from benchmarks.http_client import HttpLoad, p50
from benchmarks.http_stacks import start as start_echo
from fleet.dev.broker import free_port

ECHO_STACK = "uvicorn + httptools (raw ASGI)"
REST_QUICK, REST_FULL = Plan(6, 16, 3.0), Plan(12, 48, 10.0)  # a REST pair of 1,000 requests: about 0.5 s here
THROUGHPUT_GOAL, P50_GOAL_MS = 0.8, 0.5
Fleet = Callable[..., tuple[Any, Path]]  # benchmarks.serving._fleet


def bodies(width: int) -> dict[str, tuple[bytes, dict[str, str]]]:
    """One row of ``width`` floats as an OIP infer request: JSON tensors, and the binary tensor extension both ways."""
    x = np.random.default_rng(0).uniform(-1, 1, (1, width)).astype(np.float32)
    as_json = {"inputs": [{"name": "x", "shape": [1, width], "datatype": "FP32", "data": x.ravel().tolist()}]}
    head = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [1, width], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return {
        "JSON": (json.dumps(as_json).encode(), {}),
        "binary": (head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}),
    }


def _wait_ready(port: int, timeout: float = 120.0) -> None:
    import http.client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/models/m/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the agent's OIP endpoint never served the model")


def oip_rows(
    work: Path, host: str, port: int, quick: bool, fleet: Fleet, models: dict[str, list[int]], repeat: int = 1
) -> list[dict[str, Any]]:
    """One agent per model with ``serving.http``; the echo beside it; every body form raced in alternating rounds:
    the REST rows as ``REST_FULL`` or ``REST_QUICK`` allows, the gRPC rows (no goal: a measurement) in half its ``min_pairs``."""
    n_tp, n_lat, window = (500, 120, 16) if quick else (1000, 250, 16)
    rest = (REST_QUICK if quick else REST_FULL).scaled(max(1, repeat))
    grpc_plan = Plan(rest.min_pairs // 2, rest.min_pairs // 2, 0.0)
    echo, echo_port = start_echo(ECHO_STACK)
    grpc_echo = subprocess.Popen([sys.executable, "-c", GRPC_ECHO], stdout=subprocess.PIPE, text=True)
    assert grpc_echo.stdout is not None
    word, grpc_echo_port_text = grpc_echo.stdout.readline().split()
    assert word == "ready"
    grpc_echo_port = int(grpc_echo_port_text)
    rows = []
    try:
        for model, sizes in models.items():
            http_port = free_port()
            mwork = work / f"oip-{model}"
            mwork.mkdir()
            grpc_port = free_port()
            serving = {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
            controller, config = fleet(mwork, host, port, model, serving, {}, False)
            agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)])
            try:
                _wait_ready(http_port)
                loads = {"echo": HttpLoad("127.0.0.1", echo_port, window), "agent": HttpLoad("127.0.0.1", http_port, window)}
                cost = app_cost(mwork, sizes[0])
                for form, (body, headers) in bodies(sizes[0]).items():
                    rps, lat = _race(loads, body, headers, n_tp, n_lat, window, rest)
                    rows.append({**_oip_row(model, form, rps, lat), "in_process": cost})
                for load in loads.values():
                    load.close()
                forms = ["gRPC raw"] if quick else None  # --quick: the form tritonclient sends (5 minutes in all)
                rows += _grpc_rows(model, sizes[0], grpc_echo_port, grpc_port, n_tp, n_lat, window, grpc_plan, forms)
            finally:
                agent.send_signal(signal.SIGTERM)
                agent.wait(30)
                controller.server.stop()
    finally:
        echo.terminate()
        grpc_echo.terminate()
    return rows


GRPC_ECHO = r"""
import asyncio, grpc


async def main():
    async def echo(request, context):
        return request

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server(handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print("ready", port, flush=True)
    await server.wait_for_termination()


asyncio.run(main())
"""


def grpc_bodies(width: int) -> dict[str, bytes]:
    """The same row as ``bodies`` as a ModelInferRequest: raw bytes (what tritonclient.grpc sends) and typed values."""
    from agent.serve.oip.grpc_messages import messages

    x = np.random.default_rng(0).uniform(-1, 1, (1, width)).astype(np.float32)
    raw, typed = messages["ModelInferRequest"](model_name="m"), messages["ModelInferRequest"](model_name="m")
    raw.inputs.add(name="x", datatype="FP32", shape=[1, width])
    raw.raw_input_contents.append(x.tobytes())
    typed.inputs.add(name="x", datatype="FP32", shape=[1, width]).contents.fp32_contents.extend(x.ravel().tolist())
    return {"gRPC raw": raw.SerializeToString(), "gRPC contents": typed.SerializeToString()}


class GrpcLoad:
    """One channel to a gRPC server; ``run`` calls ModelInfer ``n`` times with ``window`` in flight, bytes both ways
    (the client parses nothing: the echo's reply and the agent's cost it the same)."""

    def __init__(self, port: int) -> None:
        import grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.call = self.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

    def run(self, body: bytes, n: int, window: int) -> tuple[float, list[float]]:
        if window == 1:
            times = []
            t0 = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                self.call(body, timeout=30)
                times.append((time.perf_counter() - t) * 1e3)
            return n / (time.perf_counter() - t0), times
        import threading

        slots, failures = threading.Semaphore(window), []

        def done(future: Any) -> None:
            if future.exception() is not None:
                failures.append(future.exception())
            slots.release()

        t0 = time.perf_counter()
        for _ in range(n):
            slots.acquire()
            self.call.future(body, timeout=30).add_done_callback(done)
        for _ in range(window):
            slots.acquire()
        elapsed = time.perf_counter() - t0
        if failures:
            raise RuntimeError(f"gRPC load: {failures[0]}")
        return n / elapsed, []

    def close(self) -> None:
        self.channel.close()


def _grpc_rows(
    model: str,
    width: int,
    echo_port: int,
    agent_port: int,
    n_tp: int,
    n_lat: int,
    window: int,
    plan: Plan,
    forms: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The agent's gRPC endpoint against a bare grpcio echo, alternating rounds as REST's (no goal set: a measurement)."""
    loads = {"echo": GrpcLoad(echo_port), "agent": GrpcLoad(agent_port)}
    rows = []
    try:
        for form, body in grpc_bodies(width).items():
            if forms is not None and form not in forms:
                continue
            for load in loads.values():
                load.run(body, 200, window)  # warm up
            rps, lat = paired_rounds(_rounds(loads, n_tp, n_lat, window, body), plan)
            rows.append({**_oip_row(model, form, rps, lat, goals=False), "in_process": None})
    finally:
        for load in loads.values():
            load.close()
    return rows


def _race(
    loads: dict[str, HttpLoad], body: bytes, headers: dict[str, str], n_tp: int, n_lat: int, window: int, plan: Plan
) -> tuple[Paired, Paired]:
    """Requests/s and p50 of the echo (baseline) and the agent in alternating rounds, as ``plan`` allows."""
    path = "/v2/models/m/infer"
    for load in loads.values():
        load.run(path, body, 200, window, headers)  # warm up: connections, caches, the agent's measured call time
    return paired_rounds(_rounds(loads, n_tp, n_lat, window, path, body, headers=headers), plan)


def _rounds(loads: dict[str, Any], n_tp: int, n_lat: int, window: int, *head: Any, **tail: Any) -> Callable[[bool], tuple[float, float]]:
    """A round of the echo (False) or the agent (True): (requests/s with ``window`` in flight, p50 ms one at a time);
    ``head`` and ``tail``: what the load's ``run`` takes before and after its count and window."""

    def round_of(agent: bool) -> tuple[float, float]:
        run = partial(loads["agent" if agent else "echo"].run, *head)
        return run(n_tp, window, **tail)[0], p50(run(n_lat, 1, **tail)[1])

    return round_of


def _oip_row(model: str, form: str, rps: Paired, lat: Paired, goals: bool = True) -> dict[str, Any]:
    added = [a - e for e, a in zip(lat.baseline, lat.subject)]
    return {
        "model": model,
        "tensors": form,
        "throughput": rps.to_json(),
        "p50_ms": lat.to_json(),
        "p50_added_ms": {"median": round(statistics.median(added), 3), "spread": [round(min(added), 3), round(max(added), 3)]},
        "throughput_goal_met": rps.ratio >= THROUGHPUT_GOAL if goals else None,
        "latency_goal_met": statistics.median(added) <= P50_GOAL_MS if goals else None,
    }


def oip_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The header and cells of the OIP table (rendered by benchmarks/serving.py next to the MQTT one)."""
    header = ["model", "tensors", "echo req/s", "OIP req/s", "ratio", "spread [min, max]", "pairs", "goal", "met"]
    header += ["echo p50 ms", "OIP p50 ms", f"added ms [min, max] (goal <= {P50_GOAL_MS})", "met"]
    header += ["in-process µs: echo app / OIP app (JSON)"]
    cells = []
    for r in rows:
        t, lat, d = r["throughput"], r["p50_ms"], r["p50_added_ms"]
        judged = r["throughput_goal_met"] is not None
        cells.append(
            [
                r["model"],
                r["tensors"],
                f"{t['baseline_median']:.0f}",
                f"{t['subject_median']:.0f}",
                f"{t['ratio_median']:.3f}",
                spread_cell(t),
                str(t["pairs"]),
                f">= {THROUGHPUT_GOAL}" if judged else "-",
                yes_no(r["throughput_goal_met"]),
                f"{lat['baseline_median']:.3f}",
                f"{lat['subject_median']:.3f}",
                f"{d['median']:.3f} [{d['spread'][0]:.3f}, {d['spread'][1]:.3f}]",
                yes_no(r["latency_goal_met"]),
                "-" if r["in_process"] is None else f"{r['in_process']['echo app_us']:.1f} / {r['in_process']['OIP app_us']:.1f}",
            ]
        )
    return header, cells


def app_cost(work: Path, width: int, calls: int = 3000, rounds: int = 4) -> dict[str, float]:
    """Per-request µs of the agent's ASGI app and of a bare echo app, called in one process without sockets, in
    alternating rounds (median): what the endpoint itself costs a request, apart from uvicorn's work both share."""
    import asyncio

    from agent.runtimes import get_runtime
    from agent.serve.host import ModelHost, ServingModel
    from agent.serve.oip.server import OipApp
    from agent.serve.serving import Serving
    from converters import builders

    sizes = [width, *([4] if width == 4 else [128, 128, 10])]
    rt = get_runtime("onnx")()
    rt.load(builders.write_onnx_mlp(builders.random_mlp(sizes, seed=1), work / f"cost-{width}.onnx"))
    host = ModelHost()
    host.swap(ServingModel("m", "1", "onnx-fp32", "0" * 64, rt))
    serving = Serving("bench", host, lambda *a: None, inline_below_ms=0.5, client_rps=0).start()  # the agent's defaults
    body = bodies(width)["JSON"][0]
    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": [], "client": ("127.0.0.1", 1)}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": message["body"]})

    async def per_call(app: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            await app(scope, receive, send)
        return (time.perf_counter() - t0) / calls * 1e6

    async def race() -> dict[str, list[float]]:
        apps = {"echo app": echo, "OIP app": OipApp(serving, host, lambda: True, 10.0)}
        out: dict[str, list[float]] = {k: [] for k in apps}
        for app in apps.values():
            await per_call(app)  # warm up; the model's call time is measured (inline from now on)
        for r in range(rounds):
            for name in list(apps) if r % 2 == 0 else list(reversed(apps)):
                out[name].append(await per_call(apps[name]))
        return out

    try:
        samples = asyncio.run(race())
        samples.update(_stages(host, rt, body, calls, rounds))
    finally:
        serving.stop()
        host.close()
    return {f"{k}_us": round(statistics.median(v), 2) for k, v in samples.items()}


def _stages(host: Any, rt: Any, body: bytes, calls: int, rounds: int) -> dict[str, list[float]]:
    """The parts of one request, each timed alone (µs, per round): where the OIP app's time goes."""
    from agent.serve.oip import codec

    req = codec.decode_infer(body, None, 1 << 22)
    assert isinstance(req.inputs, dict)
    out = host.infer("m", req.inputs)
    stages: dict[str, Callable[[], object]] = {
        "json.loads": lambda: json.loads(body),
        "decode_infer": lambda: codec.decode_infer(body, None, 1 << 22),
        "runtime.infer": lambda: rt.infer(req.inputs),
        "host.infer": lambda: host.infer("m", req.inputs),
        "encode_infer": lambda: codec.encode_infer(req, "m", "1", out),
    }
    samples: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(rounds):
        for name, fn in stages.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return samples
