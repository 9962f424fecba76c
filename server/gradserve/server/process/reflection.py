"""Server reflection under both protocol versions, with method names resolvable.

grpcio-reflection implements ``grpc.reflection.v1alpha`` only; grpcurl, Postman and grpc-js
clients ask for ``grpc.reflection.v1`` first. The v1 protocol (``grpc/reflection/v1/reflection.proto``)
is the v1alpha file under a new package name: every message, field name and field number is the
same, so the v1alpha servicer's messages are v1's bytes too. One servicer therefore answers both
service names, and the v1 file (made from the v1alpha one with its package renamed, unless the
installed protobuf already knows it) is resolvable like every other served file.

Python's descriptor pool finds messages, enums, services and fields by name but not methods:
``file_containing_symbol("gradserve.v1.SensitivityService.Compute")`` was NOT_FOUND, where the
C++, Go and Java servers answer with the service's file. The pool given to the servicer looks a
method up through its service.
"""
from __future__ import annotations

from typing import Any, Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["SERVICE_NAMES", "enable"]

_V1_PACKAGE = "grpc.reflection.v1"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_METHOD = "ServerReflectionInfo"
V1_SERVICE_NAME = f"{_V1_PACKAGE}.ServerReflection"

#: The reflection services themselves, as listed by ``list_services``.
SERVICE_NAMES = (V1_SERVICE_NAME, reflection.SERVICE_NAME)


def _v1_pool() -> Any:
    """A pool that holds the v1 reflection file: the default one if protobuf already has it."""
    default = descriptor_pool.Default()
    try:
        default.FindFileByName(_V1_FILE)
        return default
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", f".{_V1_PACKAGE}."
    proto.name, proto.package = _V1_FILE, _V1_PACKAGE
    proto.options.Clear()
    for message in proto.message_type:  # the file has no nested types
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old):]
    for method in proto.service[0].method:
        method.input_type = new + method.input_type[len(old):]
        method.output_type = new + method.output_type[len(old):]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool


class _ReflectionPool:
    """The default descriptor pool as the reflection servicer uses it, plus two things: method
    names are found through their service, and the v1 reflection file is known."""

    def __init__(self) -> None:
        self._pools = [descriptor_pool.Default()]
        v1 = _v1_pool()
        if v1 is not self._pools[0]:
            self._pools.append(v1)

    def _first(self, finder: str, *args: Any) -> Any:
        for pool in self._pools:
            try:
                return getattr(pool, finder)(*args)
            except KeyError:
                continue
        raise KeyError(args[0] if args else finder)

    def FindFileByName(self, name: str) -> Any:
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._first("FindFileContainingSymbol", symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            found = self._first("FindServiceByName", service) if service else None
            if found is None or method not in found.methods_by_name:
                raise
            return found.file

    def FindMessageTypeByName(self, name: str) -> Any:
        return self._first("FindMessageTypeByName", name)

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:
        return self._pools[0].FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Any) -> Any:
        return self._pools[0].FindAllExtensions(message)


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha on ``server``, listing ``service_names`` and themselves."""
    servicer = reflection.aio.ReflectionServicer(tuple(service_names) + SERVICE_NAMES, pool=_ReflectionPool())
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {_METHOD: handler}),
        grpc.method_handlers_generic_handler(reflection.SERVICE_NAME, {_METHOD: handler}),
    ))
