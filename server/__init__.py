"""gradserve.server: hosts TensorFlow/Keras models and serves their sensitivities over gRPC.

Modules, in the order a request meets them:

- ``cli`` / ``app`` — command line, server construction, health, reflection (``reflection``),
  signals; ``supervisor`` — ``serve --workers N``; ``cli_client`` — the client subcommands
  (``models``, ``gradient``, ``sensitivity``), which never import TensorFlow.
- ``auth`` — TLS / mutual-TLS credentials and the bearer-token interceptor.
- ``oip`` — the Open Inference Protocol front-ends (gRPC and REST), translators onto the data
  plane like ``service``; ``gsa`` — global sensitivity analysis (its own servicer, same engine).
- ``rawbytes`` / ``admission`` / ``budget`` — request bytes parsed in our code, limits of calls
  and streams that health never shares, request bytes in flight.
- ``service`` — the native gRPC servicers: request bytes parsed here, then the data plane, then
  ``encoding`` builds the messages; domain errors become gRPC status codes in one place
  (``status``). ``calls`` — default and maximum deadlines, cancellation handed down to the
  engine, metrics (``metrics``, Prometheus) and request logs with ids (``logs``).
- ``dataplane`` — ``DataPlane``, the protocol-independent core every front-end calls: resolves
  the model version, validates, plans, runs, returns NumPy results.
- ``validation`` — the only reader of ComputeRequest fields: a ``spec.ComputeSpec`` (plain NumPy)
  with the method's typed, frozen options, every field checked once.
- ``runner`` / ``batcher`` — compute threads and one dynamic batcher per model version; cheap
  engine calls on an idle model run inline on the event loop.
- ``repository`` — finds and loads models, keeps versions and their states; ``loading`` — the
  loaders (.keras, SavedModel, .h5) and safe mode.
- ``methods`` — the math of each sensitivity method, written against the engine.
- ``engine`` — per model version: compiled tf.functions keyed so requests never retrace,
  batch padding to buckets, device placement; ``litert`` — the LiteRT backend it picks per
  function where that reproduces TensorFlow's answers faster.
- ``errors`` — domain exceptions (no gRPC here); ``config`` — every limit and option.
"""
