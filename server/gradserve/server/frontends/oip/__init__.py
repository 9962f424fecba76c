"""The Open Inference Protocol (KServe v2): Triton's and KServe's clients, over gRPC and REST.

Thin front-ends on the data plane (``gradserve.server.dataplane``), in the order a request
meets them:

- ``grpc_service``: ``inference.GRPCInferenceService`` on the server's gRPC port;
- ``rest``: ``/v2/...`` over HTTP (``--http-port``), Starlette served by uvicorn on the server's
  event loop, with JSON tensors and Triton's binary tensor extension;
- ``frontend``: what both share: health, metadata, one inference with deadline and metrics;
- ``translate``: an OIP request becomes a native ComputeRequest (method and options from the
  request parameters), and a ComputeResult becomes OIP tensors;
- ``_messages`` and the generated ``_proto``: the protocol's classes in a private descriptor pool.
"""
from gradserve.server.frontends.oip.frontend import InferenceFrontEnd
from gradserve.server.frontends.oip.grpc_service import OPEN_METHODS, InferenceServicer
from gradserve.server.frontends.oip.rest import RestServer, create_app

__all__ = ["InferenceFrontEnd", "InferenceServicer", "OPEN_METHODS", "RestServer", "create_app"]
