"""What ``Runtime.infer()`` adds over calling each runtime directly, on the same model in the same run.

Goals (issue 2): within 5% of the raw call on the medium model (an MLP of 512-wide
layers), and under 10 microseconds added on the tiny one (4 floats in, 4 out).

The raw baseline is the fastest direct call we know for each runtime:
- LiteRT: ``set_tensor``; ``invoke``; ``get_tensor``.
- OpenVINO: the fastest of ``request.infer({0: x})``, a pre-bound request
  (``set_input_tensor`` of a shared-memory tensor, ``infer()``, copy the output) and
  a copy into the request's own input tensor + ``infer(share_outputs=True)``.
- ONNX Runtime: ``session.run(None, {"x": x})``.
- TensorRT (where a GPU exists): measured only through our runtime; no raw row.

Run: ``python -m benchmarks.runtime_overhead [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from agent.runtimes import get_runtime, probe_all
from benchmarks.common import interleaved, machine, write
from converters import builders

MODELS = {"tiny": [4, 4], "medium": [512, 512, 512, 512, 10]}


def raw_litert(path: Path, x: np.ndarray) -> Callable[[], object]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def call() -> object:
        it.set_tensor(i, x)
        it.invoke()
        return it.get_tensor(o)

    return call


def raw_openvino(path: Path, x: np.ndarray) -> dict[str, Callable[[], object]]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    req_dict = compiled.create_infer_request()
    req_bound = compiled.create_infer_request()
    req_own = compiled.create_infer_request()
    own = req_own.get_input_tensor(0)
    own.shape = x.shape
    own_view = own.data

    def with_dict() -> object:
        return req_dict.infer({0: x})[0]

    def prebound() -> object:
        req_bound.set_input_tensor(0, ov.Tensor(x, shared_memory=True))
        req_bound.infer()
        return req_bound.get_output_tensor(0).data.copy()

    def own_tensor() -> object:
        np.copyto(own_view, x)
        req_own.infer(share_outputs=True)
        return req_own.get_output_tensor(0).data.copy()

    return {"dict": with_dict, "prebound": prebound, "own_tensor": own_tensor}


def raw_onnx(path: Path, x: np.ndarray) -> Callable[[], object]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def call() -> object:
        return sess.run(None, {"x": x})

    return call


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = ap.parse_args(argv)
    rounds = 5 if args.quick else 15
    probes = probe_all()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        for model_name, widths in MODELS.items():
            files = _model_files(Path(d), model_name, widths)
            x = np.random.default_rng(0).standard_normal((1, widths[0])).astype(np.float32)
            for runtime, path in files.items():
                if not probes[runtime].available:
                    print(f"skip {runtime}: {probes[runtime].reason}", file=sys.stderr)
                    continue
                rows.append(_measure(runtime, model_name, path, x, rounds))
    _report(rows, rounds)
    return 0


def _model_files(root: Path, model_name: str, widths: list[int]) -> dict[str, Path]:
    """The same random MLP in each runtime's format (TensorRT builds its engine from the ONNX file)."""
    mlp = builders.random_mlp(widths, seed=0)
    files = {
        "onnx": builders.write_onnx_mlp(mlp, root / f"{model_name}.onnx"),
        "litert": builders.write_tflite_mlp(mlp, root / f"{model_name}.tflite"),
    }
    files["openvino"] = builders.write_openvino_ir(files["onnx"], root / f"{model_name}.xml")
    files["tensorrt"] = files["onnx"]
    return files


def _raw_calls(runtime: str, path: Path, x: np.ndarray) -> dict[str, Callable[[], object]]:
    """The direct calls to race against ours; none for a runtime measured only through our code."""
    if runtime == "litert":
        return {"raw": raw_litert(path, x)}
    if runtime == "openvino":
        return raw_openvino(path, x)
    if runtime == "onnx":
        return {"raw": raw_onnx(path, x)}
    return {}


def _measure(runtime: str, model_name: str, path: Path, x: np.ndarray, rounds: int) -> dict[str, Any]:
    """Our ``infer()`` and the raw calls interleaved on one model: one result row."""
    calls = 2000 if model_name == "tiny" else 300
    rt = get_runtime(runtime)()
    rt.load(path, device="CPU" if runtime == "openvino" else None)
    rt.warmup()
    feed = {"x": x}

    def ours() -> object:
        return rt.infer(feed)

    raws = _raw_calls(runtime, path, x)
    times = interleaved({"ours": ours, **raws}, calls, rounds)
    rt.close()
    row: dict[str, Any] = {"runtime": runtime, "model": model_name, "ours_us": times["ours"] * 1e6}
    if raws:
        best = min(raws, key=lambda k: times[k])
        base = times[best]
        row.update(raw_us=base * 1e6, raw_kind=best, added_us=(times["ours"] - base) * 1e6, ratio=times["ours"] / base)
        row.update({f"raw_{k}_us": times[k] * 1e6 for k in raws})
        goal_ok = row["added_us"] < 10.0 if model_name == "tiny" else row["ratio"] <= 1.05
        row["goal"] = "< 10 us added" if model_name == "tiny" else "<= 1.05x"
        row["meets_goal"] = bool(goal_ok)
    return row


def _report(rows: list[dict[str, Any]], rounds: int) -> None:
    """The table on the console, and the JSON and markdown files under ``benchmarks/results``."""
    console = Console()
    table = Table("runtime", "model", "raw µs", "ours µs", "added µs", "ratio", "goal", "met", title="runtime overhead")
    md = ["| runtime | model | raw µs | ours µs | added µs | ratio | goal | met |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [
            r["runtime"],
            r["model"],
            f"{r.get('raw_us', float('nan')):.2f}",
            f"{r['ours_us']:.2f}",
            f"{r.get('added_us', float('nan')):.2f}",
            f"{r.get('ratio', float('nan')):.3f}",
            r.get("goal", "-"),
            "yes" if r.get("meets_goal") else ("-" if "goal" not in r else "NO"),
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    info = machine()
    payload = {"benchmark": "runtime_overhead", "machine": info, "rounds": rounds, "rows": rows}
    json_path, md_path = write("runtime_overhead", payload, f"Machine: {info}\n\n" + "\n".join(md) + "\n")
    console.print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    sys.exit(main())
