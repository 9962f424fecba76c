"""Global sensitivity analysis: Sobol' indices, DGSM from exact gradients, Morris elementary effects.

A request meets the modules in this order: ``problem`` checks the factors against the model
and the limits (and estimates the analysis' peak memory); ``sampling`` gives the rows of the
sample matrix a range at a time, equal to SALib's samplers' (and scipy's Sobol' sequence for
DGSM); ``evaluate`` runs the model on them in large chunks through the model version's engine
(predict, or the gradient for DGSM), checking for cancellation and the deadline between chunks;
``analysis`` turns outputs (and gradients) into SALib's indices, in bounded slices;
``run`` puts them together for the data plane (``DataPlane.analyze``), sampling and analysing on
low-priority threads that check the call's control between slices; the gRPC servicer that
streams progress and the result is ``frontends.gsa``.

Nothing here knows gRPC; only ``evaluate`` calls into TensorFlow (through the engine).
"""
