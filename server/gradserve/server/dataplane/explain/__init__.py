"""Shapley values and partial dependence: the maths, in NumPy, apart from the engine.

- ``features``: which input elements make up each explained feature (one per element, or groups),
  and the model inputs of "these features from x, the others from a background row".
- ``coalitions``: Kernel SHAP's coalitions (the Shapley kernel, whole subset sizes enumerated
  while the budget covers them, paired random sampling of the rest) and exact enumeration.
- ``shapley``: exact Shapley values from every coalition's value, and Kernel SHAP's weighted
  least squares under the efficiency constraint.
- ``paths``: expected gradients' (Gradient SHAP's) stratified background rows and path points.
- ``grid``: partial-dependence grids from percentiles (as scikit-learn builds them).
- ``targets``: the explained scalar per example out of a model output, as the gradient methods
  take it.
- ``evaluate``: the model evaluations of each algorithm as row ranges built and reduced chunk by
  chunk, and the driver that runs them through an injected ``predict``/``gradient`` with the
  deadline and cancellation checked between chunks.

Nothing here imports TensorFlow or gRPC: the data plane passes in the functions that reach the
engine, and the unit tests pass plain NumPy functions.
"""
