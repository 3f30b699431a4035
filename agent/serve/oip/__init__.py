"""The Open Inference Protocol (KServe v2 / Triton) endpoint for local applications: ``codec`` (the messages) and
``server`` (the HTTP glue, the `http` extra)."""
