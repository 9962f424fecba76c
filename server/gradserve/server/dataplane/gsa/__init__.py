"""Global sensitivity analysis: Sobol' indices, DGSM from exact gradients, Morris elementary effects.

A request meets the modules in this order: ``problem`` checks the factors against the model
and the limits; ``sampling`` draws the samples with SALib's samplers (and scipy's Sobol'
sequence for DGSM); ``evaluate`` runs the model on them in large chunks through the model
version's engine (predict, or the gradient for DGSM), checking for cancellation and the
deadline between chunks; ``analysis`` turns outputs (and gradients) into indices with SALib's
estimators; ``run`` puts them together for the data plane (``DataPlane.analyze``); the gRPC
servicer that streams progress and the result is ``frontends.gsa``.

Nothing here knows gRPC; only ``evaluate`` calls into TensorFlow (through the engine).
"""
