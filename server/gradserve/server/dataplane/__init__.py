"""The data plane: every front-end hands it a neutral request and gets plain results back.

``plane.DataPlane`` resolves the model version, checks the request against the model
(``validation``), plans it with its method, runs it through ``compute`` and returns
``core.results``. Global sensitivity analyses (``gsa``) run through it as well, and so do
Shapley values and partial dependence (``explain``).
"""
from gradserve.server.dataplane.plane import DataPlane

__all__ = ["DataPlane"]
