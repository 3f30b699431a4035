"""Turn trained models into verified multi-runtime bundles (see issue 3).

Today this package holds the model builders that write real ONNX, TFLite and
OpenVINO IR files from numpy weights; tests, benchmarks and the demo use them to
make models without a training framework.
"""
