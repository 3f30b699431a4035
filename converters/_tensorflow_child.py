"""TensorFlow work for Keras and SavedModel sources, run in a child process.

Why a child: TensorFlow takes seconds and hundreds of MB to import and, like
OpenVINO's converter, shares native thread pools with numpy; keeping it out of the
build process keeps ``fleet build`` on ONNX/TFLite sources light and safe.

Usage:
  python -m converters._tensorflow_child prepare SOURCE WORKDIR      -> WORKDIR/signature.json (+ saved_model/)
  python -m converters._tensorflow_child reference SAVED_MODEL IN.npz OUT.npz
  python -m converters._tensorflow_child tflite SAVED_MODEL OUT.tflite {fp32|int8} [SAMPLES.npz]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIGNATURE = "serving_default"


def _spec(t: Any) -> dict[str, Any]:
    return {"name": t.name, "shape": [-1 if d is None else int(d) for d in t.shape], "dtype": t.dtype.as_numpy_dtype.__name__}


def prepare(source: Path, workdir: Path) -> None:
    import tensorflow as tf

    if source.is_dir():
        saved = source
    else:
        import keras

        model = keras.models.load_model(source, compile=False)
        saved = workdir / "saved_model"
        model.export(str(saved))
    fn = tf.saved_model.load(str(saved)).signatures[SIGNATURE]
    _, kwargs = fn.structured_input_signature
    outputs = fn.structured_outputs
    sig = {
        "saved_model": str(saved),
        "inputs": [_spec(kwargs[k]) | {"name": k} for k in sorted(kwargs)],
        "outputs": [_spec(outputs[k]) | {"name": k} for k in sorted(outputs)],
    }
    (workdir / "signature.json").write_text(json.dumps(sig))


def reference(saved: str, inputs: str, out: str) -> None:
    import numpy as np
    import tensorflow as tf

    fn = tf.saved_model.load(saved).signatures[SIGNATURE]
    with np.load(inputs, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    _, kwargs = fn.structured_input_signature
    static_batch = any(kwargs[k].shape[0] is not None for k in kwargs)
    n = next(iter(data.values())).shape[0]
    parts = []
    for i in range(n) if static_batch else [None]:
        feed = {k: tf.constant(v if i is None else v[i : i + 1]) for k, v in data.items()}
        parts.append({k: v.numpy() for k, v in fn(**feed).items()})
    np.savez(out, **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})  # type: ignore[arg-type]


def tflite(saved: str, out: str, precision: str, samples: str | None) -> None:
    import numpy as np
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    if precision == "int8":
        assert samples is not None
        with np.load(samples, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        n = next(iter(data.values())).shape[0]

        def representative() -> Any:
            for i in range(n):
                yield {k: v[i : i + 1] for k, v in data.items()}

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    Path(out).write_bytes(converter.convert())


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "prepare":
        prepare(Path(args[0]), Path(args[1]))
    elif command == "reference":
        reference(*args)
    elif command == "tflite":
        tflite(args[0], args[1], args[2], args[3] if len(args) > 3 else None)
    else:
        raise SystemExit(f"unknown command {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
