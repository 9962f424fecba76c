"""gradserve.server: hosts TensorFlow/Keras models and serves their sensitivities over gRPC.

Modules, in the order a request meets them:

- ``cli`` / ``app`` — command line, server construction, health, reflection, signals;
  ``cli_client`` — the client subcommands (``models``, ``gradient``), which never import TensorFlow.
- ``auth`` — TLS / mutual-TLS credentials and the bearer-token interceptor.
- ``calls`` — the per-call interceptor: default and maximum deadlines, cancellation handed down
  to the engine, metrics (``metrics``, Prometheus) and request logs with ids (``logs``).
- ``service`` — thin gRPC servicers: decode, validate, run, encode; the one place where
  domain errors become gRPC status codes (``status``).
- ``validation`` — turns a ComputeRequest into a ``ComputeSpec`` (plain NumPy), checking every field.
- ``repository`` — finds and loads models, keeps versions and their states; ``loading`` — the
  loaders (.keras, SavedModel, .h5) and safe mode.
- ``methods`` — the math of each sensitivity method, written against the engine.
- ``engine`` — per model version: compiled tf.functions keyed so requests never retrace,
  batch padding to buckets, device placement.
- ``errors`` — domain exceptions (no gRPC here); ``config`` — every limit and option.
"""
