"""Plain types that every layer shares; nothing here imports TensorFlow or gRPC.

- ``errors`` — the domain errors (one per status code; ``ops.status`` maps them to gRPC codes);
- ``models`` — model states, tensor signatures and the model-name rule;
- ``requests`` — the neutral request each front-end parses its wire format into;
- ``spec`` — a request checked against its model (``ComputeSpec``) and the engine call a
  method plans from it (``PreparedCall``);
- ``results`` — what the data plane answers;
- ``control`` — one call's deadline, cancellation flag and request id.
"""
