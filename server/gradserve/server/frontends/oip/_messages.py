"""The OIP message classes, built in a private descriptor pool.

tritonclient and KServe register their own ``inference.ModelInferRequest`` (and the rest) in
protobuf's default pool; a second registration of the same names there fails with a duplicate
symbol error. Classes from a pool of our own share nothing with theirs but the wire format, so
gradserve's server, tritonclient and KServe can live in one process.
"""
from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool, message_factory

from gradserve.server.frontends.oip import _proto

__all__ = ["POOL", "SERVICE", "message_class"]

POOL = descriptor_pool.DescriptorPool()
POOL.AddSerializedFile(_proto.FILE_DESCRIPTOR)
#: Full name of the gRPC service.
SERVICE = "inference.GRPCInferenceService"


def message_class(name: str) -> Any:
    """The class of message ``inference.<name>`` (e.g. ``ModelInferRequest``)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{name}"))


ServerLiveRequest = message_class("ServerLiveRequest")
ServerLiveResponse = message_class("ServerLiveResponse")
ServerReadyRequest = message_class("ServerReadyRequest")
ServerReadyResponse = message_class("ServerReadyResponse")
ModelReadyRequest = message_class("ModelReadyRequest")
ModelReadyResponse = message_class("ModelReadyResponse")
ServerMetadataRequest = message_class("ServerMetadataRequest")
ServerMetadataResponse = message_class("ServerMetadataResponse")
ModelMetadataRequest = message_class("ModelMetadataRequest")
ModelMetadataResponse = message_class("ModelMetadataResponse")
ModelInferRequest = message_class("ModelInferRequest")
ModelInferResponse = message_class("ModelInferResponse")
