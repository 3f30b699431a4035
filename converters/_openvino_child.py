"""OpenVINO conversion and NNCF quantization, run in a child process.

Why a child: after ``openvino.convert_model`` the calling process's OpenBLAS
intermittently deadlocks on its next multi-threaded matmul (seen with numpy's
scipy-openblas 0.3.31), and the build process goes on to use numpy.

Usage: python -m converters._openvino_child SOURCE OUT.xml {fp32|fp16|int8} [SAMPLES.npz]
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    source, out, precision = argv[:3]
    import openvino as ov

    model = ov.convert_model(source)
    if precision == "int8":
        import nncf
        import numpy as np

        with np.load(argv[3], allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        names = [p.get_any_name() for p in model.inputs]
        count = next(iter(data.values())).shape[0]
        # NNCF averages each item's min and max: items of one sample would shrink every
        # range towards the mean (a scalar input calibrated to ~[0, 0.6] for data in
        # [-1, 1]). Batches of many samples, where the batch dimension allows, keep the
        # ranges honest.
        dynamic_batch = all(p.get_partial_shape()[0].is_dynamic for p in model.inputs)
        step = min(count, 64) if dynamic_batch else 1
        items = [{n: data[n][i : i + step] for n in names} for i in range(0, count, step)]
        model = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
    ov.save_model(model, out, compress_to_fp16=precision == "fp16")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
