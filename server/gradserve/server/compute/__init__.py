"""Where the arithmetic happens.

- ``methods`` — the maths of each sensitivity method: a ``ComputeSpec`` becomes a
  ``PreparedCall`` (``plan``) and a traced TensorFlow body (``build``);
- ``engine`` — per model version, compiled functions keyed so that requests never retrace,
  batches padded to buckets, device placement; ``litert`` — the LiteRT backend it picks per
  function where that reproduces TensorFlow faster; ``compiler`` — engine plus warm-up;
- ``batcher`` — merges concurrent compatible calls into one engine call;
- ``runner`` — one batcher per model version, the compute threads, and the inline path for
  calls cheaper than a thread hop.
"""
