"""gradserve: a NumPy SDK for the gradserve model-sensitivity server.

``import gradserve`` never imports TensorFlow: the client needs grpcio, protobuf and NumPy only.
"""
from gradserve._async_client import AsyncClient
from gradserve._client import Client
from gradserve._exceptions import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    GradserveError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from gradserve._explain import PartialDependenceResult
from gradserve._gsa import SensitivityResult
from gradserve._models import ModelInfo, TensorInfo, VersionInfo
from gradserve._requests import ComputeResult

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ComputeResult",
    "SensitivityResult",
    "PartialDependenceResult",
    "ModelInfo",
    "TensorInfo",
    "VersionInfo",
    "GradserveError",
    "InvalidArgument",
    "NotFound",
    "FailedPrecondition",
    "Unavailable",
    "ResourceExhausted",
    "DeadlineExceeded",
    "Cancelled",
    "Unauthenticated",
    "PermissionDenied",
    "Unimplemented",
    "Internal",
    "__version__",
]
