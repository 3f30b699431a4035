"""OpenVINO conversion and NNCF quantization, run in a child process.

Why a child: after ``openvino.convert_model`` the calling process's OpenBLAS
intermittently deadlocks on its next multi-threaded matmul (seen with numpy's
scipy-openblas 0.3.31), and the build process goes on to use numpy.

Usage: python -m converters._openvino_child JOB.json   (written by ``converters.variants``; the result goes to
JOB.json.result: the layers kept in float). JOB names the source, the output, the precision, the source's tensor
names (a TFLite source's signature names, given to OpenVINO's ports by position where they differ), each input's
batch axis, fixed shapes or none, and for int8 the calibration samples and how many layers feeding which output
stay in float.
"""

from __future__ import annotations

import json
import sys
from typing import Any

WEIGHTED = {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul"}


def _rename(ports: list[Any], names: list[str]) -> None:
    if len(ports) == len(names) and not all(n in p.get_names() for p, n in zip(ports, names)):
        for p, n in zip(ports, names):
            p.get_tensor().set_names({n})


def feeding_layers(model: Any, output: str | None, count: int) -> list[str]:
    """Weighted layers that feed ``output`` (every output when None), nearest first; the first ``count`` of them."""
    frontier = [r.input_value(0).get_node() for r in model.get_results() if output is None or output in r.output(0).get_names()]
    seen: set[str] = set()
    order: list[str] = []
    while frontier and len(order) < count:
        nxt: list[Any] = []
        for node in frontier:
            name = node.get_friendly_name()
            if name in seen:
                continue
            seen.add(name)
            if node.get_type_name() in WEIGHTED:
                order.append(name)
            nxt.extend(v.get_node() for v in node.input_values())
        frontier = nxt
    return order[:count]


def _calibration(model: Any, job: dict[str, Any]) -> list[dict[str, Any]]:
    """Items cut along each input's batch axis. NNCF averages each item's min and max: items of one sample would
    shrink every range towards the mean, so batches of many samples where the model's batch dimensions allow."""
    import numpy as np

    with np.load(job["samples"], allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    axes: dict[str, int | None] = job["axes"]
    names = job["inputs"]
    batched = [(p, axes[n]) for p, n in zip(model.inputs, names) if axes[n] is not None]
    count = next((data[n].shape[a] for n, a in axes.items() if a is not None), 1)
    dynamic = bool(batched) and all(p.get_partial_shape()[a].is_dynamic for p, a in batched)
    step = min(count, 64) if dynamic else 1

    def cut(name: str, i: int) -> Any:
        axis = axes[name]
        return data[name] if axis is None else np.take(data[name], np.arange(i, min(i + step, count)), axis=axis)

    return [{p.get_any_name(): cut(n, i) for p, n in zip(model.inputs, names)} for i in range(0, count, step)]


def main(argv: list[str]) -> int:
    job = json.loads(open(argv[0]).read())
    import openvino as ov

    shapes = job["shapes"]
    fixed = {} if shapes is None else {"input": [ov.PartialShape(s) for s in shapes]}
    model = ov.convert_model(job["source"], **fixed)
    _rename(model.inputs, job["inputs"])
    _rename(model.outputs, job["outputs"])
    kept: list[str] = []
    weighted = sum(op.get_type_name() in WEIGHTED for op in model.get_ops())
    if job["precision"] == "int8":
        import nncf

        items = _calibration(model, job)
        kept = feeding_layers(model, job["output"], job["float_layers"]) if job["float_layers"] else []
        scope = nncf.IgnoredScope(names=kept, validate=False) if kept else None
        model = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), ignored_scope=scope)
    ov.save_model(model, job["out"], compress_to_fp16=job["precision"] == "fp16")
    with open(argv[0] + ".result", "w") as f:
        json.dump({"float_layers": kept, "weighted_layers": weighted}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
